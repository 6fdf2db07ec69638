/** Seeded randomness: a test's (or a fuzzer's, or a fixture agent's) "random" choices are reproducible. */

/** A seeded PRNG (mulberry32): floats in [0, 1). */
export function seeded(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Choices drawn from `seeded(seed)`: a float, an integer below `n`, an element of `xs`. */
export function chooser(seed: number): {
  rand: () => number;
  int: (n: number) => number;
  pick: <T>(xs: readonly T[]) => T;
} {
  const rand = seeded(seed);
  const int = (n: number): number => Math.floor(rand() * n);
  return { rand, int, pick: <T>(xs: readonly T[]): T => xs[int(xs.length)]! };
}
