/**
 * `fleet device export --mosquitto`: the devices file as a Mosquitto 2 password file and ACL
 * file (docs/devices.md#mosquitto), for external-broker mode where the broker, not the gateway,
 * checks device logins and topics. Pure: text in, text out.
 */
import { patternCoversFilter, substitute } from "./acl.ts";
import type { Device, DevicesConfig } from "./registry.ts";

/** The gateway's own login on the broker: full access; its hash when its password was at hand. */
export interface GatewayLogin {
  readonly username: string;
  /** `$7$` hash of the gateway's password, or null (then it is added by hand with mosquitto_passwd). */
  readonly passwordHash: string | null;
}

/** The two files, or why they cannot be written. */
export type MosquittoExport =
  | { readonly ok: true; readonly passwd: string; readonly acl: string; readonly notes: readonly string[] }
  | { readonly ok: false; readonly problems: readonly string[] };

/** Under `fleet/` a device may publish only to inboxes (docs/mqtt.md); on Mosquitto only the ACL says so. */
const INBOXES = "fleet/agents/+/+/inbox";

/** Whether some topic matches both filters. */
export function filtersOverlap(a: string, b: string): boolean {
  const x = a.split("/");
  const y = b.split("/");
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    const p = x[i];
    const q = y[i];
    if (p === "#" || q === "#") return true;
    if (p === undefined || q === undefined) return false;
    if (p !== "+" && q !== "+" && p !== q) return false;
  }
  return true;
}

/** What Mosquitto's files cannot carry (one entry per line, `user:hash` lines). */
// biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what this rejects
const UNSAFE = /[\u0000-\u001f\u007f]/;

/**
 * Mosquitto trims the spaces around the topic of an ACL line (`topic write  a/b ` grants `a/b`), and
 * a topic of spaces only leaves `topic write`, which it reads as read and write access to the topic
 * "write". A pattern with a space at either end cannot be written as it is.
 */
const SPACE_AT_END = /^ | $/;

/** Build the password file and the ACL file for `config`. */
export function mosquittoExport(config: DevicesConfig, gateway: GatewayLogin | null, at: Date): MosquittoExport {
  const problems: string[] = [];
  if (gateway) {
    if (!/^[^\s:]+$/.test(gateway.username) || UNSAFE.test(gateway.username))
      problems.push(
        `[broker] username ${JSON.stringify(gateway.username)} cannot be a Mosquitto user (no spaces, no :)`,
      );
    if (config.devices.has(gateway.username))
      problems.push(`[broker] username "${gateway.username}" is also a device id; give the gateway its own user`);
  }
  const blocks: string[] = [];
  const passwd: string[] = [];
  for (const d of config.devices.values()) {
    if (d.mosquittoHash === null) {
      problems.push(
        `device "${d.id}" has no mosquitto_secret (added before export existed): ` +
          `\`fleet device rekey ${d.id}\` issues a new secret with both hashes`,
      );
      continue;
    }
    if (d.id.includes(":")) {
      // mosquitto_passwd splits a line at its first ':': "dev:1:$7$…" is user "dev" with a bad hash.
      problems.push(`device "${d.id}": a Mosquitto user name cannot contain ':' (register it under another id)`);
      continue;
    }
    const block = deviceAcl(d, problems);
    if (block === null) continue;
    passwd.push(`${d.id}:${d.mosquittoHash}`);
    blocks.push(block);
  }
  if (problems.length > 0) return { ok: false, problems };
  const notes: string[] = [];
  if (gateway) {
    if (gateway.passwordHash) passwd.unshift(`${gateway.username}:${gateway.passwordHash}`);
    else notes.push(`the gateway's user "${gateway.username}" has no password here: add it with mosquitto_passwd`);
    blocks.unshift(
      `# The gateway ([broker] username): its subscriptions and everything it publishes.\nuser ${
        gateway.username
      }\ntopic readwrite #`,
    );
  } else {
    notes.push("fleet.toml names no [broker] username: the gateway's own user is not in these files");
  }
  const head = [
    `# Mosquitto ACL written by \`fleet device export --mosquitto\` from ${config.file}`,
    `# on ${at.toISOString()}. Re-export after editing the devices file; edits here are lost.`,
    "# Patterns are expanded per device (%c = its client id, %u = its id). Deny by default.",
    "",
  ].join("\n");
  return {
    ok: true,
    passwd: passwd.length > 0 ? `${passwd.join("\n")}\n` : "",
    acl: `${head}${blocks.join("\n\n")}\n`,
    notes,
  };
}

/** One device's `user` block, or null (with the problems noted) when it cannot be expressed safely. */
function deviceAcl(d: Device, problems: string[]): string | null {
  const who = { clientId: d.clientId, username: d.id };
  const lines = [`user ${d.id}`];
  let ok = true;
  const expand = (kind: "write" | "read", patterns: readonly string[]) => {
    for (const p of patterns) {
      const topic = substitute(p, who);
      if (topic === null) continue; // a value that is not one plain level: the pattern grants nothing
      if (UNSAFE.test(topic)) {
        problems.push(`device "${d.id}": pattern ${JSON.stringify(p)} holds a control character`);
        ok = false;
        continue;
      }
      if (SPACE_AT_END.test(topic)) {
        problems.push(
          `device "${d.id}": pattern ${JSON.stringify(p)} starts or ends with a space, which Mosquitto's ACL file ` +
            "trims (the line would grant another topic); remove the space",
        );
        ok = false;
        continue;
      }
      if (kind === "write" && filtersOverlap(topic, "fleet/#") && !patternCoversFilter(INBOXES, topic)) {
        problems.push(
          `device "${d.id}": publish pattern ${JSON.stringify(p)} reaches the fleet's own topics under fleet/ ` +
            "(outputs, status, health), which on Mosquitto only the ACL can keep devices off; " +
            "narrow it (inboxes: fleet/agents/+/%u/inbox)",
        );
        ok = false;
        continue;
      }
      lines.push(`topic ${kind} ${topic}`);
    }
  };
  expand("write", d.acl.publish);
  expand("read", d.acl.subscribe);
  return ok ? lines.join("\n") : null;
}
