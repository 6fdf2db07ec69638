/** The JSON request bodies of the API whose shape matters, as zod schemas (parsed with `parseBody`). */
import { z } from "zod";

/** `POST /api/send` (what `fleet send` posts): route `topic` like a device publish. */
export const SendBody = z.strictObject(
  {
    topic: z.string({ error: "must be a string" }).min(1, "must not be empty"),
    /** A string is sent as is, anything else as JSON; absent = null. */
    payload: z.unknown(),
    /** An explicit stimulus id (dedup key); absent = the content hash. */
    id: z
      .string({ error: "must be a string" })
      .min(1, "must not be empty")
      .max(256, "must be at most 256 characters")
      .optional(),
  },
  { error: 'must be {"topic": string, "payload": any, "id"?: string}' },
);
