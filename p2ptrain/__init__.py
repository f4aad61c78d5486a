"""p2ptrain: train one model together, peer to peer, with a ledger of who did which work.

allowlist  -- closed runs: the owner-signed list of keys allowed in, and where it is enforced
bookkeeper -- the ledger's side of a training peer: claims before rounds, receipts after, replication
checkpoint -- local checkpoints: model/optimizer safetensors + meta.json, swapped in atomically
cli        -- the ``p2ptrain`` command (the only module that prints)
compression -- what --compression sends through averaging rounds (and a working 8-bit codec)
config     -- Settings: defaults < TOML profile (peers/*.toml) < flags
dashboard  -- rich renderables drawing a Snapshot: the monitor view and the ``join`` status line
errors     -- UserError: a problem reported as one line and a non-zero exit
identity   -- the peer's Ed25519 key: libp2p identity, signing key, readable name
ledger     -- who did which work: signed claims and co-signed receipts, SQLite copy, verify, fairness
metrics    -- test-set accuracy, loss, per-class precision/recall/F1, confusion matrix
monitor    -- collects Snapshots of a swarm from the DHT for ``p2ptrain monitor``
names      -- three-word names derived from a public key
peer       -- ``join`` and ``bootstrap`` glue: DHT, trainer, heartbeats, watchdog, clean exit
presence   -- heartbeats under {run_id}_peers: who is in the swarm, who left, who crashed
robust     -- averaging rounds that refuse garbage parts and can aggregate with CenteredClip
snapshot   -- the swarm at one moment (Snapshot), its JSON/Prometheus forms, and the tracker building it
swarm      -- joining the DHT: addresses, retries, the identity check
tasks      -- the Task interface and the built-in tasks (digits-mlp, fashion-mlp)
trainer    -- one training peer: the loop around hivemind.Optimizer and its modes
"""
__version__ = "0.1.0"
