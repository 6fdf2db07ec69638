/** Wire constants of the gateway's MQTT namespace (docs/mqtt.md), in one place. */
export const topics = {
  out: (type: string, key: string) => `fleet/agents/${type}/${key}/out`,
  status: (type: string, key: string) => `fleet/agents/${type}/${key}/status`,
  inbox: (type: string, key: string) => `fleet/agents/${type}/${key}/inbox`,
  /** A `ctx.send` forwarded to the shard that owns its target (docs/shards.md). */
  send: (type: string, key: string, episode: string, n: number) => `fleet/sends/${type}/${key}/${episode}/${n}`,
  sends: "fleet/sends/#",
  /** What every forwarded send's topic starts with. */
  sendsPrefix: "fleet/sends/",
  episodes: "fleet/episodes",
  health: "fleet/health",
  /** A shard's own retained health (docs/shards.md): on `fleet/health` the shards overwrite each other. */
  shardHealth: (index: number, count: number) => `fleet/health/${index}-of-${count}`,
} as const;
