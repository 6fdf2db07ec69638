/** Wire constants of the gateway's MQTT namespace (docs/mqtt.md), in one place. */
export const topics = {
  out: (type: string, key: string) => `fleet/agents/${type}/${key}/out`,
  status: (type: string, key: string) => `fleet/agents/${type}/${key}/status`,
  inbox: (type: string, key: string) => `fleet/agents/${type}/${key}/inbox`,
  episodes: "fleet/episodes",
  health: "fleet/health",
} as const;
