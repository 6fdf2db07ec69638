/** Seeded randomness, kept beside the fixture agent that uses it (a module bundles only files of its own folder). */
export * from "../fixtures/hostile/seeded.ts";
