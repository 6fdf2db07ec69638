/** Dotted TOML key path; segments that are not bare keys are quoted, array indexes bracketed. */
export function formatKeyPath(path: readonly PropertyKey[]): string {
  let out = "";
  for (const seg of path) {
    if (typeof seg === "number") out += `[${seg}]`;
    else {
      const s = String(seg);
      out += (out === "" ? "" : ".") + (/^[A-Za-z0-9_-]+$/.test(s) ? s : JSON.stringify(s));
    }
  }
  return out;
}
