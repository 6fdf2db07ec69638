/** The JSON request bodies of the API whose shape matters, as zod schemas (parsed with `parseBody`). */
import { z } from "zod";
import { isWellFormed } from "../parse.ts";

/** `POST /api/send` (what `fleet send` posts): route `topic` like a device publish. */
export const SendBody = z.strictObject(
  {
    topic: z.string({ error: "must be a string" }).min(1, "must not be empty"),
    /** A string is sent as is, anything else as JSON (`null` too); it must be there. */
    payload: z.custom<unknown>((v) => v !== undefined, { error: "is required" }),
    /** An explicit stimulus id (dedup key, as an `Idempotency-Key` header is); absent = a new stimulus. */
    id: z
      .string({ error: "must be a string" })
      .min(1, "must not be empty")
      .max(256, "must be at most 256 characters")
      .refine(isWellFormed, "must be well-formed Unicode (no lone surrogate)")
      .optional(),
  },
  { error: 'must be {"topic": string, "payload": any, "id"?: string}' },
);

const SAMPLE = { error: "must be an integer from 1 to 10000" };

/** `POST /api/deploy/check`: the candidate fleet.toml text (absent: the file as it is now) and the sample size. */
export const DeployCheckBody = z
  .strictObject(
    {
      toml: z.string({ error: "must be a string (fleet.toml text)" }).optional(),
      episodes: z.int(SAMPLE).min(1, SAMPLE).max(10_000, SAMPLE).optional(),
      agents: z.int(SAMPLE).min(1, SAMPLE).max(10_000, SAMPLE).optional(),
      /** Types to check even when their module and config look unchanged. */
      types: z.array(z.string({ error: "must be a string" }), { error: "must be an array of type names" }).optional(),
    },
    { error: 'must be {"toml"?: string, "episodes"?: int, "agents"?: int, "types"?: string[]}' },
  )
  .nullable();
