/** What `fleet start` prints once the gateway runs. */
import { describe, expect, test } from "bun:test";
import { runningLine } from "../gateway/cli/index.ts";

const HTTP = { host: "127.0.0.1", port: 8080, noToken: false };

describe("the start line", () => {
  test("names the embedded broker's MQTT port and the HTTP address it binds", () => {
    expect(runningLine(null, 1883, HTTP, "/srv/fleet")).toBe(
      "fleet running: mqtt on port 1883, http on 127.0.0.1:8080, data in /srv/fleet",
    );
  });

  test("with [broker] url, names the external broker instead of a port the gateway does not listen on", () => {
    expect(runningLine("mqtt://127.0.0.1:21410", 21410, HTTP, "/srv/fleet")).toBe(
      "fleet running: external broker mqtt://127.0.0.1:21410, http on 127.0.0.1:8080, data in /srv/fleet",
    );
  });

  test("says when the HTTP API needs no token, and brackets an IPv6 address", () => {
    expect(runningLine(null, 1883, { host: "0.0.0.0", port: 8080, noToken: true }, "/srv/fleet")).toBe(
      "fleet running: mqtt on port 1883, http on 0.0.0.0:8080 (no token needed), data in /srv/fleet",
    );
    expect(runningLine(null, 1883, { ...HTTP, host: "::" }, "/d")).toContain("http on [::]:8080,");
  });
});
