//! `[telemetry]`: the metrics and health endpoint, and the log level.

use super::spans::Section;
use serde::Deserialize;
use std::net::SocketAddr;

/// `[telemetry]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryFile {
    /// Address of `/metrics`, `/healthz` and `/readyz`; `""` turns the endpoint off.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Log level (`error`, `warn`, `info`, `debug`, or a `tracing` filter); `RUST_LOG` wins.
    #[serde(default = "warn")]
    pub log_level: String,
}

fn default_listen() -> String {
    "127.0.0.1:9464".into()
}

fn warn() -> String {
    "warn".into()
}

/// Validates `[telemetry]`: the endpoint's address (`None`: off); the log
/// level is checked and used as written.
pub(super) fn build(file: &TelemetryFile, err: &mut Section) -> Option<SocketAddr> {
    let listen = match file.listen.trim() {
        "" => None,
        addr => match addr.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(e) => {
                err.at("listen", format!("telemetry.listen {addr:?} is not an address such as 127.0.0.1:9464: {e}"));
                None
            }
        },
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&file.log_level) {
        err.at("log_level", format!("telemetry.log_level {:?}: {e}", file.log_level));
    }
    listen
}
