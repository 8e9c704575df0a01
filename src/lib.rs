//! # riskd — a stream-processing UEBA risk scorer
//!
//! Events come in as JSON, every rule evaluates them in a fixed order,
//! per-entity state lives in a store behind a write-back cache, and alerts go
//! out as JSON lines.
//!
//! # Layout
//! - [`api`]: the read-only HTTP API (`/v1/entities/…`, `/v1/state/…`).
//! - [`config`]: `riskd.toml` and the rule files: parse, validate, compile,
//!   every error with file, line and rule id.
//! - [`event`]: an event, field paths, event time.
//! - [`rules`]: rule model, conditions (CEL with a native fast path),
//!   evaluation and alerts.
//! - [`scoring`]: entity risk: decaying scores, risk alerts, explanations.
//! - [`state`]: the state primitives, the write-back cache and the store
//!   trait with its in-memory, embedded (redb) and DynamoDB implementations.
//! - [`source`]: JSON-lines input with positions for checkpoints; Kafka
//!   client settings.
//! - [`sink`]: JSON-lines outputs (alerts, dead letters); alerts to Kafka.
//! - [`pipeline`]: the main job tying them together (from a file or from
//!   Kafka), its checkpoints, and
//!   opening, setting up and checking the configured store.
//! - [`reload`]: live reload on SIGHUP and on rule file changes.
//! - [`route`]: `riskd route`, re-keying raw Kafka events by entity.
//! - [`generate`]: a synthetic CloudTrail/Okta stream for benchmarks and demos.
//! - [`telemetry`]: every metric, health, the HTTP endpoint, logging.
//! - [`tuning`]: rule tests, replays (backtests), check warnings.

#![deny(unsafe_code)]

pub mod api;
pub mod config;
pub mod event;
pub mod generate;
pub mod pipeline;
pub mod reload;
pub mod route;
pub mod rules;
pub mod scoring;
pub mod sink;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod tuning;

pub use pipeline::{run, RunOptions, Summary};
