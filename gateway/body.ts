/** Reading HTTP bodies with a size cap, without buffering past it (requests and responses). */

/** The body's bytes, or null when it is (or announces itself as) larger than `cap`. */
export async function readBodyCapped(msg: Request | Response, cap: number): Promise<Uint8Array | null> {
  const declared = Number(msg.headers.get("content-length") ?? "0");
  if (declared > cap) return null;
  const reader = msg.body?.getReader();
  if (!reader) return new Uint8Array(0);
  const parts: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    total += value.byteLength;
    if (total > cap) {
      await reader.cancel().catch(() => undefined);
      return null;
    }
    parts.push(value);
  }
  return new Uint8Array(Buffer.concat(parts));
}
