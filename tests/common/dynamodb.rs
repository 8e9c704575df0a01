//! DynamoDB Local instances of a test's own, for tests that stop, freeze or
//! restart the store (the others share the one `scripts/test.sh` starts).

use super::{wait_for, Guard};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// DynamoDB Local's jar, from `scripts/test.sh`.
pub fn jar() -> PathBuf {
    PathBuf::from(std::env::var("RISKD_TEST_DYNAMODB_JAR").unwrap_or_else(|_| {
        panic!("RISKD_TEST_DYNAMODB_JAR is not set: run ./scripts/test.sh, which installs DynamoDB Local")
    }))
}

/// Whether something accepts connections on the loopback port.
pub fn answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Sends process `pid` a signal (`STOP`, `CONT`, …).
pub fn send_signal(pid: u32, signal: &str) {
    let sent = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().expect("kill runs");
    assert!(sent.success(), "kill -{signal} {pid} failed");
}

/// A DynamoDB Local of the test's own (killed when dropped).
pub struct DynamoLocal {
    java: Guard,
    pub port: u16,
}

impl DynamoLocal {
    /// Starts one on `port`, keeping its data in the folder `data` (so it
    /// survives a restart) or in memory; returns once it accepts connections.
    pub fn start(port: u16, data: Option<&Path>) -> Self {
        let jar = jar();
        let dir = jar.parent().expect("the jar's folder");
        let mut java = Command::new("java");
        java.current_dir(dir).args(["-Xmx256m", "-Djava.library.path=./DynamoDBLocal_lib", "-jar"]).arg(&jar);
        java.args(["-sharedDb", "-disableTelemetry"]);
        match data {
            Some(data) => java.arg("-dbPath").arg(data),
            None => java.arg("-inMemory"),
        };
        let child = java
            .args(["-port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("java runs DynamoDB Local");
        let java = Guard(child);
        wait_for("DynamoDB Local", Duration::from_secs(60), || answers(port));
        DynamoLocal { java, port }
    }

    /// Its endpoint, for `store.endpoint_url`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The JVM's process id.
    pub fn pid(&self) -> u32 {
        self.java.0.id()
    }

    /// Sends the JVM a signal: `STOP` freezes it (the kernel still accepts
    /// connections on its port, nothing answers them), `CONT` thaws it.
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal);
    }

    /// Stops it (SIGTERM) and waits until it is gone; killed outright
    /// after 30 s. Killed at once, DynamoDB Local can lose writes it has
    /// acknowledged (seen once in the suite: a checkpoint gone back after a
    /// restart), which no real store does and riskd rightly refuses to
    /// commit over: a test that restarts it on its data stops it this way.
    pub fn stop(mut self) {
        send_signal(self.pid(), "TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.java.0.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub fn kill(mut self) {
        let _ = self.java.0.kill();
        let _ = self.java.0.wait();
    }
}
