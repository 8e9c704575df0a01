//! A synthetic, deterministic stream of CloudTrail and Okta events with
//! attacks planted, for benchmarks, demos and tests at scale
//! (`riskd generate`). The same seed always gives the same bytes.

use crate::event::format_time_ms;
use serde_json::{json, Value};
use std::io::{self, Write};

/// What to generate.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Number of events.
    pub events: u64,
    /// Number of distinct users.
    pub users: u32,
    /// Seed of the pseudo-random sequence.
    pub seed: u64,
    /// Event time of the first event (ms since the epoch).
    pub start_ms: i64,
    /// Event time between consecutive events (ms).
    pub step_ms: i64,
    /// One event in this many starts a planted attack (0: none).
    pub attack_every: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Self { events: 1000, users: 100, seed: 1, start_ms: 1_700_000_000_000, step_ms: 100, attack_every: 5000 }
    }
}

/// splitmix64: small, fast, deterministic; statistical quality is enough here.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const CITIES: [(&str, f64, f64); 8] = [
    ("New York", 40.7128, -74.006),
    ("London", 51.5074, -0.1278),
    ("Paris", 48.8566, 2.3522),
    ("Tokyo", 35.6762, 139.6503),
    ("Sydney", -33.8688, 151.2093),
    ("Sao Paulo", -23.5505, -46.6333),
    ("Berlin", 52.52, 13.405),
    ("Toronto", 43.6532, -79.3832),
];

const READ_CALLS: [(&str, &str); 6] = [
    ("GetObject", "s3.amazonaws.com"),
    ("PutObject", "s3.amazonaws.com"),
    ("DescribeInstances", "ec2.amazonaws.com"),
    ("ListBuckets", "s3.amazonaws.com"),
    ("GetCallerIdentity", "sts.amazonaws.com"),
    ("Decrypt", "kms.amazonaws.com"),
];

fn user_name(u: u64) -> String {
    format!("user{u:05}")
}

fn home_ip(u: u64) -> String {
    format!("10.{}.{}.{}", (u >> 16) & 255, (u >> 8) & 255, u & 255)
}

fn cloudtrail(time: i64, user: &str, ip: &str, name: &str, source: &str) -> Value {
    json!({
        "eventVersion": "1.08",
        "eventTime": format_time_ms(time),
        "eventSource": source,
        "eventName": name,
        "awsRegion": "us-east-1",
        "sourceIPAddress": ip,
        "userAgent": "aws-cli/2.15.0 Python/3.11.6 Linux/6.1",
        "userIdentity": {
            "type": "IAMUser",
            "principalId": format!("AIDA{}", user.to_uppercase()),
            "arn": format!("arn:aws:iam::123456789012:user/{user}"),
            "accountId": "123456789012",
            "userName": user
        },
        "requestParameters": {"bucketName": "corp-data"},
        "responseElements": null,
        "eventType": "AwsApiCall",
        "recipientAccountId": "123456789012"
    })
}

fn okta_login(time: i64, user: &str, ip: &str, city: (&str, f64, f64)) -> Value {
    json!({
        "uuid": format!("okta-{time}-{user}"),
        "published": format_time_ms(time),
        "eventType": "user.session.start",
        "displayMessage": "User login to Okta",
        "severity": "INFO",
        "outcome": {"result": "SUCCESS"},
        "actor": {"id": format!("00u{user}"), "type": "User", "alternateId": format!("{user}@example.com"), "displayName": user},
        "client": {
            "ipAddress": ip,
            "userAgent": {"rawUserAgent": "Mozilla/5.0", "os": "Mac OS X", "browser": "CHROME"},
            "geographicalContext": {"city": city.0, "country": "XX", "geolocation": {"lat": city.1, "lon": city.2}}
        }
    })
}

/// Writes `spec.events` JSON lines to `out`; returns the number of planted attacks.
// Long on purpose: one pass of the random generator, whose draws must stay
// in this order for a seed to keep giving the same stream (benchmarks and
// tests compare against it).
pub fn write_stream(spec: &Spec, out: &mut impl Write) -> io::Result<u64> {
    let mut rng = Rng(spec.seed);
    let mut attacks = 0;
    let mut i = 0u64;
    let users = u64::from(spec.users.max(1));
    let mut line = Vec::with_capacity(2048);
    let mut emit = |v: Value, i: &mut u64, out: &mut dyn Write| -> io::Result<()> {
        line.clear();
        serde_json::to_writer(&mut line, &v).map_err(io::Error::other)?;
        line.push(b'\n');
        out.write_all(&line)?;
        *i += 1;
        Ok(())
    };
    while i < spec.events {
        let t = spec.start_ms + (i as i64) * spec.step_ms;
        let u = rng.below(users);
        let user = user_name(u);
        if spec.attack_every > 0 && rng.below(spec.attack_every) == 0 {
            attacks += 1;
            let kind = rng.below(5);
            let burst = match kind {
                0 => (0..12)
                    .map(|k| {
                        let mut e = cloudtrail(t + k * 1000, &user, &home_ip(u), "GetObject", "s3.amazonaws.com");
                        e["errorCode"] = json!("AccessDenied");
                        e
                    })
                    .collect::<Vec<_>>(),
                1 => {
                    let mut e = cloudtrail(
                        t,
                        &user,
                        &format!("203.0.113.{}", rng.below(250)),
                        "AssumeRole",
                        "sts.amazonaws.com",
                    );
                    e["requestParameters"] = json!({"roleArn": format!("arn:aws:iam::123456789012:role/role{:03}", u % 50), "roleSessionName": user});
                    vec![e]
                }
                2 => {
                    let ip = format!("198.51.100.{}", rng.below(250));
                    (0..22)
                        .map(|k| {
                            let victim = user_name((u + k * 7) % users);
                            let mut e =
                                cloudtrail(t + k as i64 * 500, &victim, &ip, "ConsoleLogin", "signin.amazonaws.com");
                            e["responseElements"] = json!({"ConsoleLogin": "Failure"});
                            e["eventType"] = json!("AwsConsoleSignIn");
                            e
                        })
                        .collect()
                }
                _ => {
                    // Impossible travel (and an IP change): two logins far apart, minutes apart.
                    let a = CITIES[rng.below(4) as usize];
                    let b = CITIES[4 + rng.below(4) as usize];
                    vec![
                        okta_login(t, &user, &home_ip(u), a),
                        okta_login(t + 600_000, &user, &format!("192.0.2.{}", rng.below(250)), b),
                    ]
                }
            };
            for e in burst {
                if i >= spec.events {
                    break;
                }
                emit(e, &mut i, out)?;
            }
            continue;
        }
        let roll = rng.below(100);
        let e = if roll < 70 {
            let (name, source) = READ_CALLS[rng.below(READ_CALLS.len() as u64) as usize];
            let mut e = cloudtrail(t, &user, &home_ip(u), name, source);
            if rng.below(200) == 0 {
                e["errorCode"] = json!("AccessDenied");
            }
            e
        } else if roll < 75 {
            let mut e = cloudtrail(t, &user, &home_ip(u), "AssumeRole", "sts.amazonaws.com");
            e["requestParameters"] = json!({"roleArn": format!("arn:aws:iam::123456789012:role/role{:03}", u % 50), "roleSessionName": user});
            e
        } else if roll < 80 {
            let mut e = cloudtrail(t, &user, &home_ip(u), "ConsoleLogin", "signin.amazonaws.com");
            let ok = rng.below(20) != 0;
            e["responseElements"] = json!({"ConsoleLogin": if ok { "Success" } else { "Failure" }});
            e["eventType"] = json!("AwsConsoleSignIn");
            e
        } else if roll < 95 {
            okta_login(t, &user, &home_ip(u), CITIES[(u % 8) as usize])
        } else {
            json!({
                "uuid": format!("okta-{t}-{user}"),
                "published": format_time_ms(t),
                "eventType": "user.authentication.sso",
                "actor": {"alternateId": format!("{user}@example.com"), "type": "User"},
                "client": {"ipAddress": home_ip(u)},
                "target": [{"type": "AppInstance", "alternateId": "Salesforce"}]
            })
        };
        emit(e, &mut i, out)?;
    }
    Ok(attacks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes() {
        let spec = Spec { events: 500, attack_every: 50, ..Spec::default() };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        write_stream(&spec, &mut a).unwrap();
        write_stream(&spec, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.iter().filter(|&&c| c == b'\n').count(), 500);
    }
}
