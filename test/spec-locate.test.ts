/**
 * Schema errors in fleet.toml and devices.toml name the line and column of the key at fault
 * (gateway/spec/locate.ts), as syntax errors do: the scanner maps key paths to where they are
 * written, through every TOML form a key can take.
 */
import { describe, expect, test } from "bun:test";
import { compileDevices, DevicesError } from "../gateway/devices/index.ts";
import { compileSpec, keyPlaces, placeOf, SpecError } from "../gateway/spec/index.ts";

const FILE = "/etc/fleet/fleet.toml";

async function specError(text: string): Promise<SpecError> {
  try {
    await compileSpec(text, FILE);
  } catch (err) {
    if (err instanceof SpecError) return err;
    throw err;
  }
  throw new Error("compiled without error");
}

/** The place of `path` in `text`, as "line:column". */
function at(text: string, path: PropertyKey[]): string {
  const p = placeOf(keyPlaces(text), path);
  return p ? `${p.line}:${p.column}` : "none";
}

describe("keyPlaces", () => {
  test("tables, plain, dotted and quoted keys", () => {
    const text = [
      '# a comment [with] "quotes" = 1',
      "[fleet]",
      "name = 'x'",
      "  a.b . c = 1",
      '[agents."odd name".budget]',
      '"quoted key" = 2',
      "",
    ].join("\n");
    expect(at(text, ["fleet"])).toBe("2:1");
    expect(at(text, ["fleet", "name"])).toBe("3:1");
    expect(at(text, ["fleet", "a", "b", "c"])).toBe("4:3");
    expect(at(text, ["agents", "odd name", "budget"])).toBe("5:1");
    expect(at(text, ["agents", "odd name", "budget", "quoted key"])).toBe("6:1");
  });

  test("inline tables, arrays and arrays of tables, elements by index", () => {
    const text = [
      "[t]",
      "limits = { memory_mb = 1, inner = { deep = true } }",
      "list = [",
      "  'a', # one",
      "  { k = 1 },",
      "]",
      "[[t.items]]",
      "n = 1",
      "[[t.items]]",
      "n = 2",
      "",
    ].join("\n");
    expect(at(text, ["t", "limits", "memory_mb"])).toBe("2:12");
    expect(at(text, ["t", "limits", "inner", "deep"])).toBe("2:37");
    expect(at(text, ["t", "list", 0])).toBe("4:3");
    expect(at(text, ["t", "list", 1, "k"])).toBe("5:5");
    expect(at(text, ["t", "items", 0, "n"])).toBe("8:1");
    expect(at(text, ["t", "items", 1, "n"])).toBe("10:1");
  });

  test("lines inside multi-line strings, escaped quotes and CRLF line ends are counted", () => {
    const text = [
      "[t]",
      'a = """',
      "line one \\",
      '  "quoted" ""still in"" """',
      "b = '''",
      "x = not a key",
      "'''",
      'c = "say \\"d = 1\\""',
      "d = 4",
    ].join("\r\n");
    expect(at(text, ["t", "b"])).toBe("5:1");
    expect(at(text, ["t", "x"])).toBe("1:1"); // not a key: only its table is found
    expect(at(text, ["t", "c"])).toBe("8:1");
    expect(at(text, ["t", "d"])).toBe("9:1");
  });

  test("a key that is not written is placed at the nearest table that is, or nowhere", () => {
    const text = "[agents.t]\nmodule = 'm.ts'\n";
    expect(at(text, ["agents", "t", "budget", "memory_mb"])).toBe("1:1");
    expect(at(text, ["fleet", "name"])).toBe("none");
  });

  test("a table made only by a subtable's header or a dotted key is placed where that is written", () => {
    const text = "[fleet]\nname = 'x'\n\n[agents.t.budget]\nmemory_mb = 1\n[hooks]\nh.agent = 't/k'\n";
    expect(at(text, ["agents", "t", "module"])).toBe("4:1");
    expect(at(text, ["agents"])).toBe("4:1");
    expect(at(text, ["hooks", "h", "secret_env"])).toBe("7:1");
  });

  test("text that is not TOML ends the scan with what it found, without hanging", () => {
    for (const text of ["]]]]\n= = =\n{", "[a]\nx = [1, =, }\ny = 2\n", 'k = "open\n', "[[\n", "a = { b = \n"])
      expect(keyPlaces(text)).toBeInstanceOf(Map);
    expect(at("[a]\nx = [1, =, }\ny = 2\n", ["a"])).toBe("1:1");
  });
});

describe("schema errors name the line and column", () => {
  test("an unknown key: its own line", async () => {
    const err = await specError("[fleet]\nname = 'x'\n\n[agents.t]\nmodule = 'm.ts'\n  surge = 2\n");
    expect(err.keyPath).toBe("agents.t.surge");
    expect([err.line, err.column]).toEqual([6, 3]);
    expect(err.message).toBe(`${FILE}:6:3: agents.t.surge is not a known key`);
  });

  test("a required key missing from a table that has no header of its own: the line that made the table", async () => {
    const err = await specError("[fleet]\nname = 'x'\n\n[agents.t.budget]\nmemory_mb = 128\n");
    expect(err.message).toBe(`${FILE}:4:1: agents.t.module is required`);
  });

  test("every problem after the first is placed on its own line too", async () => {
    const err = await specError(
      "[agents.a]\nmodule = 'a.ts'\nbudget = { memory_mb = 1 }\n" +
        "[agents.b]\nmodule = 'b.ts'\n[agents.b.budget]\nmemory_mb = 2\n",
    );
    const lines = err.message.split("\n");
    expect(lines).toHaveLength(2);
    expect(lines[0]).toStartWith(`${FILE}:3:12: agents.a.budget.memory_mb `);
    expect(lines[1]).toStartWith(`${FILE}:7:1: agents.b.budget.memory_mb `);
  });

  test("devices.toml: an unknown key and a bad ACL pattern are placed", () => {
    const text = "[devices.a]\npublish = ['ok/#', 'a/#/b']\npassword = 'x'\n";
    let err: unknown = null;
    try {
      compileDevices(text, "d.toml");
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(DevicesError);
    const message = (err as Error).message;
    expect(message).toContain("d.toml:2:20: devices.a.publish[1] is not a valid ACL pattern");
    expect(message).toContain("d.toml:3:1: devices.a.password is not a known key");
  });
});
