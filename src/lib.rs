//! # riskd — a stream-processing UEBA risk scorer
//!
//! Events come in as JSON, every rule evaluates them in a fixed order,
//! per-entity state lives in a store behind a write-back cache, and alerts go
//! out as JSON lines.
//!
//! # Layout
//! Lowest layer first; a module uses only those above it in this list.
//! - [`event`]: an event, field paths, event time.
//! - [`alert`]: what riskd emits: an alert about an entity, its severity.
//! - [`telemetry`]: every metric, the health state, logging (no stage).
//! - [`shutdown`]: asking a job's threads to stop, and sleeping until then.
//! - [`state`]: the state primitives, the write-back cache, the store trait
//!   with its memory, embedded (redb) and DynamoDB implementations, and
//!   opening the configured one. Knows neither rules nor sources.
//! - [`rules`]: rule model, conditions (CEL with a native fast path),
//!   evaluation over a cache the caller hands in.
//! - [`scoring`]: entity risk: decaying scores, risk alerts, explanations.
//! - [`config`]: `riskd.toml` and the rule files: parse, validate, compile,
//!   every error with file, line and rule id. Builds settings; opens nothing.
//! - [`source`]: JSON-lines input with positions; decoding lines and
//!   messages into events.
//! - [`kafka`]: Kafka client settings and the client context shared by the
//!   consumer, the router and the producers.
//! - [`sink`]: JSON-lines outputs (alerts, dead letters), held until synced
//!   so a failed sync is retried whole; Kafka producers.
//! - [`pipeline`]: the main job, from a file or from Kafka, with its
//!   checkpoints, retries and outputs.
//! - [`route`]: `riskd route`, re-keying raw Kafka events by entity.
//! - [`tuning`]: rule tests, replays (backtests), check warnings.
//! - [`web`]: the analyst's pages as HTML (leaderboard, entity), every value escaped.
//! - [`api`]: the read-only HTTP API (`/v1/entities…`, `/v1/state/…`) and the pages.
//! - [`http`]: the one HTTP server: metrics, health, the API.
//! - [`reload`]: live reload on SIGHUP and on rule file changes.
//! - [`service`]: the long-running process: signals, shutdown, the HTTP
//!   server, reloads, around the main job or the router.
//! - [`generate`]: a synthetic CloudTrail/Okta stream for benchmarks and demos.

#![deny(unsafe_code)]

pub mod alert;
mod api;
pub mod config;
pub mod event;
pub mod generate;
mod http;
pub mod kafka;
pub mod pipeline;
mod reload;
mod route;
pub mod rules;
pub mod scoring;
pub mod service;
pub mod shutdown;
mod sink;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod tuning;
pub mod web;

pub use api::TOKEN_ENV;
pub use pipeline::{RunOptions, Summary};
pub use service::run;
