/**
 * The center's side of a restored data dir (store/identity.ts): its pushes mark the gateway id it
 * took over from superseded, in the center's `meta`; reads leave that gateway out unless it is named.
 */

/** Central `meta` key that marks `gateway` superseded (its value: the gateway that superseded it). */
export const supersededKey = (gateway: string): string => `superseded:${gateway}`;
