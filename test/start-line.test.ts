/** What `fleet start` prints once the gateway runs. */
import { describe, expect, test } from "bun:test";
import { runningLine } from "../gateway/cli/index.ts";

describe("the start line", () => {
  test("names the embedded broker's MQTT port", () => {
    expect(runningLine(null, 1883, 8080, "/srv/fleet")).toBe(
      "fleet running: mqtt on port 1883, http on port 8080, data in /srv/fleet",
    );
  });

  test("with [broker] url, names the external broker instead of a port the gateway does not listen on", () => {
    expect(runningLine("mqtt://127.0.0.1:21410", 21410, 8080, "/srv/fleet")).toBe(
      "fleet running: external broker mqtt://127.0.0.1:21410, http on port 8080, data in /srv/fleet",
    );
  });
});
