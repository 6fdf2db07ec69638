/**
 * Where each key of a TOML document is written, so a schema error can name its line and column
 * as a syntax error does. smol-toml gives positions only for syntax errors; schema problems come
 * with key paths (`agents.t.budget.memory_mb`, `devices.a.publish[0]`), and this scanner maps
 * each path to the place its key (or array element) starts.
 *
 * It walks the text once and knows TOML's structure, not its values: table headers, arrays of
 * tables, dotted and quoted keys, inline tables, arrays, the four string forms and comments.
 * It runs only on text smol-toml has already parsed, so it does not check anything itself.
 */
import { formatKeyPath } from "./key-path.ts";

/** A 1-based line and column. */
export interface Place {
  readonly line: number;
  readonly column: number;
}

/** Each key path written in `text` (as `formatKeyPath` spells it) and where it starts. */
export function keyPlaces(text: string): Map<string, Place> {
  return new Scanner(text).scan();
}

/**
 * Where `path` is written in a document whose places are `places`: the key itself, else the
 * nearest enclosing key or table that is (a required key that is missing is reported at its
 * table), else null.
 */
export function placeOf(places: ReadonlyMap<string, Place>, path: readonly PropertyKey[]): Place | null {
  for (let n = path.length; n > 0; n--) {
    const place = places.get(formatKeyPath(path.slice(0, n)));
    if (place) return place;
  }
  return null;
}

const BARE_KEY = /[A-Za-z0-9_-]/;

class Scanner {
  private i = 0;
  private line = 1;
  /** Index of the current line's first character. */
  private lineStart = 0;
  private readonly places = new Map<string, Place>();
  /** Elements seen so far of each array of tables, by path. */
  private readonly tableArrays = new Map<string, number>();

  constructor(private readonly text: string) {}

  scan(): Map<string, Place> {
    let table: PropertyKey[] = [];
    for (;;) {
      this.skipBlank(true);
      if (this.i >= this.text.length) return this.places;
      if (this.text.startsWith("[[", this.i)) {
        const at = this.place();
        this.i += 2;
        const path = this.key();
        this.skipBlank(false);
        this.i += 2; // ]]
        const name = formatKeyPath(path);
        const index = (this.tableArrays.get(name) ?? -1) + 1;
        this.tableArrays.set(name, index);
        table = [...path, index];
        this.mark(path, at);
        this.mark(table, at);
      } else if (this.text[this.i] === "[") {
        const at = this.place();
        this.i++;
        table = this.key();
        this.skipBlank(false);
        this.i++; // ]
        this.mark(table, at);
      } else this.keyValue(table);
    }
  }

  /** `key = value` under `table`. */
  private keyValue(table: readonly PropertyKey[]): void {
    const at = this.place();
    const path = [...table, ...this.key()];
    this.mark(path, at);
    this.skipBlank(false);
    this.i++; // =
    this.value(path);
  }

  private value(path: readonly PropertyKey[]): void {
    this.skipBlank(false);
    const c = this.text[this.i];
    if (c === "{") {
      this.i++;
      for (;;) {
        this.skipBlank(false);
        if (this.text[this.i] === "}" || this.i >= this.text.length || this.text[this.i] === "\n") break;
        this.keyValue(path);
        this.skipBlank(false);
        if (this.text[this.i] === ",") this.i++;
      }
      this.i++;
    } else if (c === "[") {
      this.i++;
      for (let index = 0; ; index++) {
        this.skipBlank(true);
        if (this.text[this.i] === "]" || this.i >= this.text.length) break;
        const element = [...path, index];
        this.mark(element, this.place());
        const from = this.i;
        this.value(element);
        if (this.i === from) this.i++; // not a value (text smol-toml did not read): step over it
        this.skipBlank(true);
        if (this.text[this.i] === ",") this.i++;
      }
      this.i++;
    } else if (c === '"' || c === "'") this.string();
    else while (this.i < this.text.length && !/[,\]}\n#]/.test(this.text[this.i]!)) this.i++;
  }

  /** A dotted key: bare or quoted parts with optional blanks around the dots. */
  private key(): string[] {
    const parts: string[] = [];
    for (;;) {
      this.skipBlank(false);
      const c = this.text[this.i];
      if (c === '"' || c === "'") parts.push(this.string());
      else {
        const start = this.i;
        while (this.i < this.text.length && BARE_KEY.test(this.text[this.i]!)) this.i++;
        parts.push(this.text.slice(start, this.i));
      }
      this.skipBlank(false);
      if (this.text[this.i] !== ".") return parts;
      this.i++;
    }
  }

  /** A string of any of the four forms, from its opening quote; its value (escapes decoded, as JSON reads them). */
  private string(): string {
    const q = this.text[this.i]!;
    const multi = this.text.startsWith(q.repeat(3), this.i);
    this.i += multi ? 3 : 1;
    const start = this.i;
    for (;;) {
      if (this.i >= this.text.length) return this.text.slice(start);
      const c = this.text[this.i]!;
      if (c === "\\" && q === '"') {
        // A line-ending backslash escapes the newline itself.
        if (this.text[this.i + 1] === "\n") this.newline(this.i + 2);
        this.i += 2;
        continue;
      }
      if (c === "\n") this.newline(this.i + 1);
      if (c === q && (!multi || this.text.startsWith(q.repeat(3), this.i))) {
        // A multi-line string may end with up to two quotes of its own before its closing three.
        let end = this.i;
        if (multi) while (this.text[end + 3] === q) end++;
        const raw = this.text.slice(start, end);
        this.i = end + (multi ? 3 : 1);
        return q === '"' && !multi ? decodeBasic(raw) : raw;
      }
      this.i++;
    }
  }

  /** Skip spaces, tabs and comments, and newlines too when `newlines`. */
  private skipBlank(newlines: boolean): void {
    while (this.i < this.text.length) {
      const c = this.text[this.i]!;
      if (c === " " || c === "\t" || c === "\r") this.i++;
      else if (c === "#") while (this.i < this.text.length && this.text[this.i] !== "\n") this.i++;
      else if (c === "\n" && newlines) {
        this.i++;
        this.newline(this.i);
      } else return;
    }
  }

  /** A new line starts at `start`. */
  private newline(start: number): void {
    this.line++;
    this.lineStart = start;
  }

  private place(): Place {
    return { line: this.line, column: this.i - this.lineStart + 1 };
  }

  /**
   * The first place a path is written wins (a table header before its keys, a key before redefinitions).
   * Its enclosing tables too: `[agents.x.budget]` or `agents.x.key = …` makes `agents.x` without a header
   * of its own, and a key missing from it (`agents.x.module is required`) is reported there.
   */
  private mark(path: readonly PropertyKey[], at: Place): void {
    for (let n = 1; n <= path.length; n++) {
      const name = formatKeyPath(path.slice(0, n));
      if (!this.places.has(name)) this.places.set(name, at);
    }
  }
}

/** A basic string's value: its escapes decoded (an escape JSON does not know is kept as written). */
function decodeBasic(raw: string): string {
  if (!raw.includes("\\")) return raw;
  try {
    return JSON.parse(
      `"${raw.replace(/\\U([0-9A-Fa-f]{8})/g, (_, h) => String.fromCodePoint(Number.parseInt(h, 16)))}"`,
    );
  } catch {
    return raw;
  }
}

/** A schema or cross-check problem: where (key path segments) and what. */
export interface Problem {
  readonly path: readonly PropertyKey[];
  readonly message: string;
}

/** What a `ConfigFileError` for `problems` says: a line each, and where the first one is. */
export interface ProblemsReport {
  readonly detail: string;
  readonly line: number | null;
  readonly column: number | null;
  readonly keyPath: string | null;
}

/**
 * Problems of the document `text` (from `file`) as an error reports them: the first one's line
 * and column go in the error's own prefix (`file:line:column: `), each later one that can be
 * placed is prefixed the same way on its own line, so an editor can jump to every one.
 */
export function reportProblems(file: string, text: string, problems: readonly Problem[]): ProblemsReport {
  let places = new Map<string, Place>();
  try {
    places = keyPlaces(text);
  } catch {
    // no places: the key paths alone still say where
  }
  const said = (p: Problem) => (p.path.length === 0 ? p.message : `${formatKeyPath(p.path)} ${p.message}`);
  const lines = problems.map((p, i) => {
    const at = i === 0 ? null : placeOf(places, p.path);
    return at ? `${file}:${at.line}:${at.column}: ${said(p)}` : said(p);
  });
  const first = problems[0];
  const at = first ? placeOf(places, first.path) : null;
  return {
    detail: lines.join("\n"),
    line: at?.line ?? null,
    column: at?.column ?? null,
    keyPath: first && first.path.length > 0 ? formatKeyPath(first.path) : null,
  };
}
