/**
 * Agent source never reaches Bun's parser in the gateway with an import attribute that could make
 * it a macro.
 *
 * A Bun macro (`import { f } from "./m.ts" with { type: "macro" }`) runs while the importing file
 * is parsed, in the process that parses it: `Bun.build`, and even `Bun.Transpiler.scanImports`,
 * run it in the gateway, with its environment, its files and its user. `bun --no-macros` does not
 * reach those APIs (Bun 1.4.5), and a bundler plugin never sees the macro's import. So the
 * gateway reads each agent file itself first and lets through only import attributes it can read
 * at a glance: a bare `type` naming a data loader. Anything else (a macro, an escaped or quoted
 * key, a comment inside) is refused. Inside the episode sandbox, where agent code runs anyway,
 * nothing is checked.
 */

/** `with {` / `assert {` (also `with: {` of a dynamic import's options), comments allowed between. */
const CLAUSE = /\b(?:with|assert)(?:\s|\/\*[\s\S]*?\*\/|\/\/[^\n]*(?:\n|$))*:?(?:\s|\/\*[\s\S]*?\*\/)*\{/g;

/** The one form of import attributes let through: `{ type: "json" }` and the other data loaders. */
const PLAIN = /^\{\s*type\s*:\s*(["'])(?:json|jsonc|toml|text|file)\1\s*,?\s*\}$/;

/**
 * Why `source` may not be parsed in the gateway (an import attribute other than a plain data
 * `type`), or null. Conservative: text that only looks like a clause (`"with {"` in a string) is
 * refused too, and says where.
 */
export function macroRisk(source: string): string | null {
  for (const m of source.matchAll(CLAUSE)) {
    const open = m.index + m[0].length - 1;
    const close = source.indexOf("}", open);
    const clause = close < 0 ? source.slice(open) : source.slice(open, close + 1);
    if (PLAIN.test(clause)) continue;
    const line = source.slice(0, m.index).split("\n").length;
    return (
      `line ${line}: import attributes ${JSON.stringify(clause.slice(0, 60))} are not allowed in agent code ` +
      '(only { type: "json" | "jsonc" | "toml" | "text" | "file" }: a Bun macro would run in the gateway)'
    );
  }
  return null;
}
