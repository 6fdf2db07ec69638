/**
 * What each fleet.toml key means, for the generated reference (docs/fleet-toml.md).
 * Types, defaults and allowed values come from the zod schema itself (./schema.ts), so the
 * reference cannot drift from what the loader accepts; this file adds only the prose, and
 * test/docs.test.ts fails when a key has none or the committed page is stale
 * (`bun scripts/gen-docs.ts` rewrites it).
 */
import { z } from "zod";
import { fleetSchema } from "./schema.ts";

/** One line per key; `*` stands for an agent type or hook name. */
export const KEY_DOCS: Readonly<Record<string, string>> = {
  fleet: "The fleet as a whole.",
  "fleet.name":
    "Name of this fleet (shown in status, health and metrics; make it unique per site). A rename applies " +
    "live, except with a span exporter ([telemetry] otlp_endpoint) or [replication], which read it at start.",
  "fleet.data_dir":
    "Where the libSQL database and runtime files live (created 0700). A relative path is taken from the " +
    "directory `fleet` runs in, unlike module paths, which are relative to fleet.toml (a systemd unit sets " +
    "WorkingDirectory, or give an absolute path); `--data-dir` overrides it.",
  "fleet.max_concurrent_episodes":
    "Episodes running at once across the fleet; one at a time per agent always. During an intake burst, flooded " +
    "agents (a backlog while others have work) share a quarter of it, and other agents' episodes start at a pace " +
    "(docs/sandbox.md, devices first).",
  "fleet.synchronous":
    '"full" survives power loss (fsync on every commit); "normal" survives process crashes only (WAL).',
  "fleet.drain_timeout_ms":
    "On SIGTERM, how long in-flight episodes may finish before they are killed (their stimuli stay queued, " +
    "the attempt is not counted as failed, but its budget use is booked: it runs again after the restart and " +
    "makes its tool calls again); " +
    "a replication push in flight then gets as long again for the center's answer (unanswered, it goes again at " +
    "the next start). At most 2147483647 (~24.8 days).",
  "fleet.max_send_hops":
    "Most `ctx.send`s in a row from something that came into the fleet (a device's message, a timer, a webhook, " +
    "the CLI) to the message an episode runs: a send one further is denied (`ToolDenied`, recorded in the " +
    "episode's log), which ends a loop of agents sending to each other. Wake-ups in between are followed; a " +
    "send forwarded to another shard carries the count under MQTT 5 (`broker.mqtt_version`), and starts it " +
    "again under 3.1.1. 0 = no limit. Applies live.",
  "fleet.disk_free_limit_mb":
    "Free space (MB) to keep on the disk of the data dir (RabbitMQ's disk_free_limit). Below it, stimuli from " +
    "outside the fleet are refused as a full queue refuses them (MQTT: no PUBACK; HTTP: 503 " +
    "storage_unavailable with Retry-After) until the free space is back above the limit plus a tenth; what was " +
    "accepted still runs, timers and wake-ups go on, /readyz is 503. The room left is for the writes that free " +
    "space (retention, `fleet gc`) and an operator's pause or reload; the pages they free inside fleet.db count as " +
    "free space (the file does not shrink). 0: none. Applied on reload.",
  "fleet.sandbox":
    'How episode subprocesses are isolated: "auto" picks the strongest available (see [sandbox.md](sandbox.md)).',
  "fleet.allow_weak_sandbox":
    'Accept sandbox = "uid" or "none" where bubblewrap works ' +
    "(they leave an agent the network, the file system and detached children).",
  "fleet.sandbox_uids":
    '"first:count" (as in /etc/subuid): when the gateway runs as root, each episode process runs as a uid of ' +
    "its own from this range, so its process limit is its own and it cannot signal another's. Use uids no " +
    "account or other service has. Gateways on one machine claim their ranges at start: the default moves up to " +
    "the next free block of 65,536 where another gateway holds it, a range set here that overlaps one is " +
    "refused. Read at start.",
  "fleet.shard":
    '"i/N": this gateway is shard i of N sharing the fleet on an external broker ([broker] url); it records ' +
    "and runs only the agents rendezvous hashing gives it (see [shards.md](shards.md)). Read at start.",
  "fleet.warm_spares":
    "Sandboxed subprocesses started ahead of need, per set of episode limits (types with other budgets keep theirs, " +
    "up to twice this many in all); each still serves exactly one episode.",
  broker: "The embedded MQTT broker, or (with url) the existing broker the gateway is a client of.",
  "broker.host":
    "Address the MQTT listeners bind; default 127.0.0.1, or 0.0.0.0 when devices must log in " +
    "(allow_anonymous = false). An anonymous broker on another address is refused (see allow_anonymous_network).",
  "broker.mqtt_port":
    "MQTT (TCP) port; 0 picks a free one (written to <data_dir>/gateway.json). Embedded broker only (refused " +
    "with url).",
  "broker.ws_port": "MQTT over WebSocket port; 0 picks a free one (gateway.json); absent: no WebSocket listener.",
  "broker.max_packet_bytes":
    "Largest MQTT packet accepted; a larger one closes the connection before it is buffered. " +
    "Agents are held to it too: a larger publish or send is denied, a larger emit fails its episode (too_large).",
  "broker.max_connections":
    "Most open MQTT connections (TCP, TLS, WebSocket); past it a device " +
    "gets CONNACK 3 (counted in /metrics). 0 = no limit. Applies live. Embedded broker only (refused with url).",
  "broker.allow_anonymous":
    "false: devices need credentials from the devices file. Applies live (anonymous sessions are closed). " +
    "Without a host key, turning it off keeps the listener on 127.0.0.1 until a restart moves it to 0.0.0.0; " +
    "turning it on needs a restart (the listener moves to loopback).",
  "broker.allow_anonymous_network":
    "true: allow_anonymous with a non-loopback host is accepted (anyone who reaches it can publish). Default: " +
    "refused. Embedded broker only (refused with url).",
  "broker.persistence":
    'Where MQTT sessions live: "libsql" keeps subscriptions, offline queues, retained messages and wills ' +
    'in <data_dir>/broker.db across restarts; "memory" loses them on any restart. Embedded broker only (refused ' +
    "with url).",
  "broker.trust_dup":
    "true: devices set DUP on every retransmission (MQTT-3.3.1-1), so a QoS 1/2 message with DUP = 0 is always a " +
    "new message, even one that repeats its client id, packet id and payload within redelivery_minutes (a " +
    "device that numbers its packets from 1 at each connection and repeats a reading). false (the default): " +
    "such a message is taken for a retransmission, because mqtt.js resends an unacknowledged message after a " +
    "reconnect with DUP = 0. Read at start. Embedded broker only (refused with url: the gateway sees that broker's " +
    "DUP flag, not the device's).",
  "broker.max_offline_messages":
    "Messages kept per persistent client session (queued + in flight), with either persistence; past it a new " +
    "message for that client is dropped (the oldest are kept), counted and logged. Embedded broker only (refused " +
    "with url).",
  "broker.max_offline_bytes":
    "Payload bytes kept per persistent client session (queued + in flight), with either persistence " +
    "(Mosquitto's max_queued_bytes); past it a new message for that client is dropped, counted and logged, as " +
    "past max_offline_messages. 0 (the default): only max_offline_messages bounds the queue. Read at start. " +
    "Embedded broker only (refused with url).",
  "broker.max_offline_bytes_total":
    "Payload bytes kept in all persistent sessions' queues together (queued + in flight), with either " +
    'persistence: with "memory" a bound on the gateway\'s memory however many sessions devices open, with ' +
    '"libsql" on broker.db\'s size. Past it a new message is queued for no session (each session keeps what ' +
    "it holds), counted and logged as past max_offline_messages; a connected client still gets it live. 0 (the " +
    "default): only each session's bounds. Read at start. Embedded broker only (refused with url).",
  "broker.session_expiry_days":
    "A persistent (clean session 0) session whose client has been away this many days ends, as a clean session " +
    "1 CONNECT would end it: its subscriptions, offline queue and QoS 2 state go (Mosquitto's " +
    "persistent_client_expiration). Time the gateway was stopped does not count. Fractions allowed; 0 or absent: " +
    "never. Embedded broker only (refused with url). Read at start.",
  "broker.sys_interval":
    "Seconds between refreshes of the $SYS/broker/ tree (Mosquitto's sys_interval and names: version, uptime, " +
    "clients/connected, clients/disconnected, clients/total, clients/maximum, clients/expired, subscriptions/count, " +
    "retained messages/count, publish/messages/received, publish/messages/sent, publish/messages/dropped, " +
    "bytes/received, bytes/sent, and load/<counter>/{1min,5min,15min}: docs/broker.md), " +
    "retained, counts only (no client " +
    "id). A client may subscribe to $SYS/... filters where the devices file's ACL grants them (anonymous clients: " +
    "always). 0: no tree, and $SYS filters are refused (0x80). Read at start. Embedded broker only (refused with url).",
  "broker.devices":
    "Devices file (credentials and ACLs, see docs/devices.md); reloaded when it changes. A new path applies live.",
  "broker.tls_port": "MQTT over TLS (mqtts) port; needs tls_cert and tls_key. 0 picks a free one (gateway.json).",
  "broker.wss_port": "MQTT over secure WebSocket port; needs tls_cert and tls_key. 0 picks a free one (gateway.json).",
  "broker.tls_cert": "PEM certificate (chain) of the TLS listeners; relative to fleet.toml. Read at start.",
  "broker.tls_key": "PEM private key of tls_cert; relative to fleet.toml. Read at start.",
  "broker.connection_messages":
    "true: log each client's connect (client id, user name, address, keep alive, clean session) and disconnect " +
    'at info ("client connected", "client disconnected"), as Mosquitto\'s connection_messages (whose default is ' +
    "true; here false, so a reconnect storm does not fill the log). Refused connects are logged either way (bad " +
    "credentials at most one line per 10 s). " +
    "Applied live. Embedded broker only (refused with url).",
  "broker.max_keepalive":
    "Largest keep alive (seconds) a device's CONNECT may ask for; a larger one, or 0 (never pinging), gets " +
    "CONNACK 2 (identifier rejected), as Mosquitto's max_keepalive answers MQTT 3.1.1 clients: a device that " +
    "never pings would hold a dead connection, its client id and its will until TCP notices. 0 (the default): " +
    "any. At most 65535. A new value applies live to new connections. Embedded broker only (refused with url).",
  "broker.tls_ca": "PEM CA bundle: when set, TLS clients must present a certificate it signed.",
  "broker.tls_crl":
    "PEM file of certificate revocation lists (Mosquitto's crlfile): a client certificate they revoke is refused " +
    "in the TLS handshake, on the mqtts and wss listeners. Re-read when the file changes (connections already " +
    "open stay; a file that does not parse is logged and the previous lists kept). Keep it fresh: past a list's " +
    "next update every client certificate of its CA is refused. Needs tls_ca. Embedded broker only.",
  "broker.use_identity_as_username":
    "true: on the mqtts listener (tls_port), the subject CN of the client's certificate (signed by tls_ca) is its " +
    "device id, whatever user name the CONNECT gives, and no secret is asked (Mosquitto's " +
    "use_identity_as_username). The device must be in the devices file, on its own client id; its ACL applies, " +
    "and removing it closes the session. A certificate with no single CN is refused (CONNACK 5). The wss " +
    "listener still asks for user name and secret. Needs tls_ca, tls_port and devices. Embedded broker only " +
    "(refused with url). Read at start.",
  "broker.url":
    '"mqtt://host:port" or "mqtts://host:port": embed no broker; the gateway is a client of this one with a ' +
    "persistent session (see [broker.md](broker.md#external-broker)). Read at start.",
  "broker.username": "User name the gateway logs in with (external broker). Read at start.",
  "broker.password_env": "Environment variable holding the gateway's password (external broker). Read at start.",
  "broker.client_id":
    'The gateway\'s client id on the external broker, i.e. its persistent session; default "fleet-<fleet name>". ' +
    "Changing it abandons the queued session.",
  "broker.ca_file":
    'PEM CA bundle that signs the external broker\'s certificate (with "mqtts://"); default: system CAs.',
  "broker.mqtt_version":
    '"5" or "3.1.1", spoken to the external broker. MQTT 5 adds user properties on outputs, message expiry ' +
    "and no-local subscriptions. The embedded broker speaks 3.1.1 only.",
  http: "The HTTP API, dashboard, /metrics and webhooks.",
  "http.host": "Address the HTTP server binds. Every /api call and the dashboard need a token (docs/access.md).",
  "http.port": "HTTP port; 0 picks a free one (written to <data_dir>/gateway.json).",
  "http.tls_cert": "PEM certificate (chain): the API, dashboard and webhooks are served over HTTPS. Read at start.",
  "http.tls_key": "PEM private key of http.tls_cert.",
  "http.allowed_hosts":
    "Host names the API answers to besides IP addresses, localhost and http.host (DNS-rebinding guard).",
  "http.open_metrics": "true: /healthz, /readyz and /metrics answer any peer without a token (default: loopback only).",
  "http.allow_unauthenticated":
    "true: the API and dashboard need no token (only behind a proxy that authenticates). Logged at start and " +
    "when a reload turns it on; like the other access keys and limits of [http], a reload applies it at once.",
  "http.max_concurrent_requests":
    "Requests handled at once, event streams included (they may take half of it at most, webhooks and sign-in " +
    "a quarter); past it 503 with Retry-After. /healthz always answers.",
  "http.max_body_bytes_in_flight":
    "Request body bytes held at once across all requests, counted as they arrive (webhook and sign-in bodies: " +
    "half of it at most); past it 503 with Retry-After.",
  llm: "The OpenAI-compatible endpoint behind the `llm` tool.",
  "llm.url": "Base URL of the endpoint (`/chat/completions` is appended).",
  "llm.model": "Model name sent with every request.",
  "llm.api_key_env":
    "Environment variable (of the gateway) holding the API key; never visible to agents (an endpoint that " +
    "echoes it has it scrubbed from the answer, as `agents.*.secrets` are).",
  "llm.timeout_ms": "Timeout of one llm call (at most 2147483647 ms, ~24.8 days, as every delay in ms).",
  agents: "Agent types, one table each: `[agents.<type>]`.",
  "agents.*.module": "The agent module (default export made by defineAgent); relative to fleet.toml.",
  "agents.*.subscribe": "MQTT topic filters whose messages are stimuli for this type.",
  "agents.*.key": "Instance key from the topic: `{1}` is the first wildcard's segment, and so on.",
  "agents.*.instances": "Agent keys deployed up front (they get timer stimuli before any message).",
  "agents.*.every":
    'Timer interval ("30s", "5m", "1h30m"); each fire is a stimulus of kind "timer". Fires line up with the ' +
    'Unix epoch, not with the start: "1h" on the hour, "7d" on Thursdays at 00:00 UTC.',
  "agents.*.cron":
    "Timer as a cron expression, instead of `every`, always in UTC whatever the gateway's TZ (there is no " +
    'time zone option): "0 8 * * *" is 08:00 UTC. 5 fields (minute hour day month weekday), or 6 with ' +
    'seconds first ("*/10 * * * * *"); no year field.',
  "agents.*.catch_up":
    "Timer fires missed while the gateway was down, and fires that queued up while the agent was paused or busy: " +
    '"none", "one" (run only the newest) or "all" (capped at 100 after downtime). A timer that a hot reload adds ' +
    "or whose schedule it changes starts from the reload: nothing before it is caught up. Downtime before a " +
    "timer's first fire counts too: a new hourly timer whose gateway is off overnight catches up in the morning.",
  "agents.*.dedup":
    'The stimulus id from the payload: a field path ("id", "device.seq") or a template ("{device}:{seq}"); ' +
    "a brace that opens or closes no field is an error. Absent: only MQTT retransmissions are deduplicated.",
  "agents.*.tools": "Tools this type may call (publish, http, llm, send); any other call is denied and recorded.",
  "agents.*.publish":
    "Topic filters the publish tool may write (the agent's own fleet/agents/... topics always, but for out, " +
    "status and inbox: the gateway's).",
  "agents.*.http_hosts":
    "Hosts the http tool may reach: `host` (every port) or `host:port` (that port; `example.com:443` " +
    "allows https://example.com/). Names are compared lowercased and addresses canonical (`127.1` is " +
    "127.0.0.1); an IPv6 address is written in brackets (`[::1]`, `[::1]:8080`). The agent cannot set " +
    "the Host header: a call reaches the host its URL names.",
  "agents.*.secrets":
    "Environment variable names the http tool may inject as {{secret:NAME}} in header values (not the URL or " +
    "body); a call naming one that is unset is denied. The value (and the value trimmed, as a header sends " +
    "it) is scrubbed from the response's headers and body, in every spelling JSON has for it (`\\uXXXX` " +
    "escapes included), longest secret first, when 4 characters or longer; a host that echoes it in another " +
    "encoding (base64, URL-encoded) defeats that, so list only hosts you trust.",
  "agents.*.config":
    "Table handed to the agent as ctx.config; checked at validate and deploy against its module's config schema.",
  "agents.*.max_queue": "Stimuli that may wait per agent; past it intake refuses (no PUBACK, the device retries).",
  "agents.*.max_agents":
    "Most agents of this type that may exist (not retired), `instances` included (a list longer is an error); " +
    "0: no limit. The default is the 100,000 agents one box is built for; lower it for a type whose keys come " +
    "from devices or sends you do not control. A stimulus that would create one more agent (a topic or " +
    "inbox with a new key, a send to a new key) is refused like a full queue's: no PUBACK (the device " +
    "retries), a denied send, HTTP 429 `max_agents`; " +
    "counted in `fleet_agents_refused_total`, logged once a minute per type at most. Retiring an agent frees " +
    "a place; lowering the cap retires none (no new ones until fewer exist). Sharded: per shard.",
  "agents.*.max_wakeups":
    "Wake-ups (`ctx.wakeIn` / `ctx.wakeAt`) an agent may have pending at once; one more throws `ToolDenied`. " +
    "Lowered by a reload below what an agent has pending, it stops only new ones: the agent runs and may cancel.",
  "agents.*.budget":
    "Limits per agent; exceeding one pauses the agent until its window resets, an operator resumes it, " +
    "or a reload raises that budget past what the agent has used.",
  "agents.*.budget.episodes_per_hour":
    "Episodes per hour window; every attempt counts, a failed one too, and one a shutdown aborted.",
  "agents.*.budget.tool_calls_per_episode": "Tool calls one episode may make.",
  "agents.*.budget.tokens_per_day":
    "llm tokens per day window. Each call holds its max_tokens (capped at what is left) until the endpoint " +
    "answers, then is charged the usage it reports: the larger of total_tokens and prompt_tokens + " +
    "completion_tokens. It is charged the whole max_tokens when it reports none, no completion_tokens, or " +
    "counts that are not non-negative integers, and when the call times out, is cut off by the end of its " +
    "episode, or the endpoint answers a 200 " +
    "that is not a chat completion or is over 1 MiB (it may have spent them); an error status (4xx, 5xx) or " +
    "an endpoint that cannot be reached is charged nothing. A call denied while the tokens left are held by " +
    "calls in flight says so.",
  "agents.*.budget.episode_timeout_ms":
    "Wall-clock limit of one episode; past it the subprocess is killed (timeout). At most 2147483647 (~24.8 days).",
  "agents.*.budget.memory_mb":
    "Memory ceiling of the episode's process tree, with what it keeps in its private /tmp (bubblewrap) and, in a " +
    "memory cgroup (root, cgroup v1), memory no process's RSS shows (memfd, shared memory); past it the " +
    "subprocess is killed (oom).",
  "agents.*.budget.tool_costs":
    "Cost charged per call of each tool, against cost_per_day. Only calls that went out are charged: a call " +
    "refused (a tool, host, topic or secret not allowed, a bad argument, no tokens or cost left) costs nothing.",
  "agents.*.budget.cost_per_day":
    "Cost per day window (0 = no cost budget). Held per call: a call whose cost would pass what is left " +
    "today (calls made at once share it) is denied with ToolDenied; the agent pauses once it reaches it.",
  "agents.*.budget.bytes_per_day":
    "Bytes the agent's episodes store in fleet.db per day window (0 = no limit): the UTF-8 size of each " +
    "episode's event log as JSON (stimulus, ctx.log lines, records, tool calls), its checkpoint state, its " +
    "outgoing messages, the stimuli it sends to other agents and the wake-ups it sets; rows' fixed overhead " +
    "(ids, hashes, indexes) is not counted. Failed attempts count their event log. An episode that crosses it " +
    "is still committed whole; the next one waits. The default (256 MiB) leaves room for a busy agent: " +
    "3600 episodes an hour of ~2 KB each store ~170 MB a day.",
  "agents.*.checkpoint": "Checkpoint retention.",
  "agents.*.checkpoint.keep":
    "Newest checkpoints kept per agent; older ones are collected, the chain stays verifiable (0 = keep all).",
  "agents.*.retry":
    "What happens when an episode fails. A retried attempt runs the agent again from its checkpoint: its " +
    "http and llm calls are made again (and charged again).",
  "agents.*.retry.max_attempts": "Attempts per stimulus before it is quarantined.",
  "agents.*.retry.backoff_ms":
    "Wait before the second attempt; doubles with each further one. At most 2147483647 (~24.8 days).",
  "agents.*.rollout": "How a change to this type is deployed (docs/upgrading.md).",
  "agents.*.rollout.require_check":
    "A hot reload that changes this type's module, code or config is applied only when the replay gate " +
    "(`fleet deploy --check`) finds no DIVERGED or FAILED episode; otherwise it is refused as a reload error.",
  "agents.*.rollout.canary":
    "Share of this type's agents (0 to 1, a stable choice by the hash of the agent id) that run new code " +
    "first; the others stay on the previous bundle until it is promoted. 0: new code reaches every agent at once. " +
    "A share that selects none of the type's agents takes the one whose id hashes lowest (with a warning). " +
    "With a share, a reload that changes both the code and the config of the type is refused, and so is one " +
    "that changes its config while some of its agents run the previous bundle (a rollout in progress, rolled " +
    "back or aborted).",
  "agents.*.rollout.min_episodes": "Episodes the canaries must run on new code before it can be promoted.",
  "agents.*.rollout.max_failure_rate":
    "Failed share of the canaries' episodes on new code past which it is rolled back by itself " +
    "(the canaries return to the previous bundle and their failed stimuli are retried there).",
  "agents.*.rollout.bake":
    'How long new code runs on the canaries, at least, before it is promoted (a duration like "10m").',
  hooks: "Webhooks, one table each: `POST /hooks/<name>`.",
  "hooks.*.agent": "The agent (<type>/<key>) every call goes to, or use `type` + `key_field`.",
  "hooks.*.type": "The agent type; the key comes from the body's `key_field`.",
  "hooks.*.key_field": "Body field naming the agent key (with `type`).",
  "hooks.*.dedup":
    "Body field whose value is the stimulus id (the Idempotency-Key header wins); present but not a string of " +
    "1-256 characters (well-formed Unicode) or a finite number: 400.",
  "hooks.*.secret_env": "Environment variable holding the shared secret (HMAC X-Fleet-Signature or Bearer).",
  "hooks.*.max_body_bytes":
    "Largest body accepted (413 past it); keep it under half of [http] max_body_bytes_in_flight (webhook bodies " +
    "may hold no more together).",
  telemetry: "OpenTelemetry export: one span per episode, with its tool calls, decisions and outputs.",
  "telemetry.otlp_endpoint":
    "OTLP/HTTP collector URL (spans are POSTed as JSON to <url>/v1/traces); absent: nothing is exported. Spans the " +
    "collector does not take (down, an error status, no answer in time) are lost, counted in " +
    "fleet_telemetry_spans_dropped_total{reason} (rejected|timeout|unreachable) and logged, a warning a minute " +
    "at most.",
  "telemetry.service_name": "The spans' service.name (default: [fleet] name).",
  retention:
    "How long history is kept. Every minute the gateway collects in passes of 500 rows until nothing is due; " +
    "each pass reaches old rows through indexes, so its cost follows what it collects, not how much history " +
    "the store holds.",
  "retention.episodes_days": "Episode logs older than this are collected (the hash chain stays verifiable).",
  "retention.dedup_days":
    "A stimulus id from a `dedup` key, an Idempotency-Key or a timer is remembered at least this long " +
    "after its stimulus is finished. A quarantined stimulus is not finished: it is kept (and its id stays " +
    "a duplicate) until an operator retries or drops it, or `quarantine_days` drops it.",
  "retention.quarantine_days":
    "A stimulus quarantined this long (since its last attempt) is dropped by retention, as `fleet quarantine " +
    "drop` would: state `dropped`, its id remembered `dedup_days` more; logged with the count and counted " +
    'in `fleet_retention_collected_total{kind="quarantine_expired"}`. An unattended box with one bad device ' +
    "would otherwise keep every poison message it sends. 0: kept until an operator retries or drops it.",
  "retention.redelivery_minutes":
    "Without a `dedup` key, a QoS 1/2 message is deduplicated only against MQTT retransmissions " +
    "(same client, packet id and content) for this long.",
  replication: "Push every record to a central libSQL server (sqld); see docs/replication.md. Read at start.",
  "replication.url":
    "The central server: http(s)://, libsql:// or ws(s):// of sqld, without credentials, in the userinfo or " +
    "as ?authToken= (fleet.toml is replicated with the spec version): the token comes from auth_token_env. " +
    "The one query parameter it takes is tls=0 or tls=1.",
  "replication.auth_token_env": "Environment variable holding the server's JWT (sent as a bearer token).",
  "replication.interval":
    "How often an idle replicator looks for new rows; while episodes commit, it pushes at most one round of " +
    "batches per interval (docs/replication.md). At most 24 days.",
  "replication.batch_rows": "Queue entries per pushed batch (an episode brings its events and checkpoint).",
  "replication.required": "Retention keeps every row the center has not confirmed (until max_backlog_mb).",
  "replication.max_backlog_mb":
    "Past this backlog retention stops waiting for the center; rows it then collects are counted as lost.",
};

type Json = {
  type?: string | string[];
  properties?: Record<string, Json>;
  additionalProperties?: Json | boolean;
  items?: Json;
  enum?: unknown[];
  default?: unknown;
  anyOf?: Json[];
  minimum?: number;
  exclusiveMinimum?: number;
  maximum?: number;
  pattern?: string;
};

/** One documented key. */
export interface KeyRef {
  readonly path: string;
  readonly type: string;
  readonly default: string;
  readonly required: boolean;
  readonly doc: string | undefined;
}

function typeOf(s: Json): string {
  if (s.enum) return s.enum.map((v) => JSON.stringify(v)).join(" \\| ");
  if (s.anyOf) return s.anyOf.map(typeOf).join(" \\| ");
  const t = Array.isArray(s.type) ? s.type.join(" \\| ") : (s.type ?? "any");
  if (t === "array" && s.items) return `array of ${typeOf(s.items)}`;
  if (t === "object") return "table";
  if (t === "integer" && s.minimum === 0 && s.maximum === 65535) return "port";
  if (t === "integer" && (s.exclusiveMinimum === 0 || (s.minimum ?? 0) > 0)) return "positive integer";
  if (t === "integer" && s.minimum === 0) return "integer ≥ 0";
  return t;
}

function walk(s: Json, path: string, required: readonly string[], out: KeyRef[]): void {
  const props = s.properties ?? {};
  for (const [key, child] of Object.entries(props)) {
    const p = path ? `${path}.${key}` : key;
    const isTable = child.type === "object";
    out.push({
      path: p,
      type: typeOf(child),
      default: child.default === undefined || isTable ? "" : JSON.stringify(child.default),
      required: required.includes(key),
      doc: KEY_DOCS[p],
    });
    if (child.properties) walk(child, p, (child as { required?: string[] }).required ?? [], out);
    else if (isTable && typeof child.additionalProperties === "object" && child.additionalProperties.properties) {
      const entry = child.additionalProperties;
      walk(entry, `${p}.*`, (entry as { required?: string[] }).required ?? [], out);
    }
  }
}

/** Every key of fleet.toml with its type, default and meaning, in schema order. */
export function fleetTomlKeys(): KeyRef[] {
  const schema = z.toJSONSchema(fleetSchema, { unrepresentable: "any", io: "input" }) as Json;
  const out: KeyRef[] = [];
  walk(schema, "", [], out);
  return out;
}

/** docs/fleet-toml.md, generated. */
export function fleetTomlReference(): string {
  const keys = fleetTomlKeys();
  const sections = new Map<string, KeyRef[]>();
  for (const k of keys) {
    const top = k.path.split(".")[0]!;
    sections.set(top, [...(sections.get(top) ?? []), k]);
  }
  const lines = [
    "# fleet.toml reference",
    "",
    "<!-- Generated by `bun scripts/gen-docs.ts` from the zod schema (gateway/spec/schema.ts) and",
    "     gateway/spec/reference.ts. Do not edit by hand: test/docs.test.ts fails when it is stale. -->",
    "",
    "Every key the loader accepts. Unknown keys are errors; an invalid file never replaces the",
    "running spec. The error names the file, line and column, and for a key that is wrong the key",
    "path too (`fleet.toml:12:1: agents.t.budget.memory_mb must be ...`; a key that is missing is",
    'placed at its table). `*` is an agent type or hook name. Durations are strings like `"30s"`,',
    '`"5m"`, `"1h30m"`.',
    "",
    "The running gateway watches fleet.toml (and its agents' modules): a change is applied once the",
    "file has been still for about a second (two reads 1 s apart find the same text, size and",
    "mtime). A file written in place (`cat >`, scp, `rsync --inplace`) is applied as it is then: a",
    "writer that pauses longer mid-way gets its part applied. Replacing the file by rename (write a",
    "copy, `mv` it over fleet.toml; most editors do this) is the atomic way. SIGHUP (`systemctl",
    "reload fleet`) reads it at once. `bun scripts/bench.ts redeploy` measures both while episodes run",
    "(SPEC: an edit takes effect within 2 s): an edit was live 1.16 s after the write (median, 1.17 s",
    "at worst), SIGHUP 52 ms after the signal, on a 2-core box.",
    "",
  ];
  for (const [top, rows] of sections) {
    const table = rows[0]!;
    lines.push(`## \`[${top}]\``, "", table.doc ?? "", "", "| key | type | default | meaning |", "|---|---|---|---|");
    for (const k of rows.slice(1)) {
      const name = k.path.slice(top.length + 1);
      const dflt = k.required ? "required" : k.default ? `\`${k.default}\`` : "—";
      lines.push(`| \`${name}\` | ${k.type} | ${dflt} | ${(k.doc ?? "").replaceAll("|", "\\|")} |`);
    }
    lines.push("");
  }
  return `${lines.join("\n").trimEnd()}\n`;
}
