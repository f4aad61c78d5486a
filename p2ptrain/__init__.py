"""p2ptrain: train one model together, peer to peer, with a ledger of who did which work.

checkpoint -- local checkpoints: model/optimizer safetensors + meta.json, swapped in atomically
cli        -- the ``p2ptrain`` command (the only module that prints)
config     -- Settings: defaults < TOML profile (peers/*.toml) < flags
dashboard  -- rich renderables drawing a Snapshot: the monitor view and the ``join`` status line
errors     -- UserError: a problem reported as one line and a non-zero exit
identity   -- the peer's Ed25519 key: libp2p identity, signing key, readable name
ledger     -- who did which work: signed claims and co-signed receipts, SQLite copy, verify, fairness
metrics    -- test-set accuracy, loss, per-class precision/recall/F1, confusion matrix
names      -- three-word names derived from a public key
snapshot   -- the swarm at one moment (Snapshot), its JSON/Prometheus forms, and the tracker building it
tasks      -- the Task interface and the built-in tasks (digits-mlp, fashion-mlp)
"""
__version__ = "0.1.0"
