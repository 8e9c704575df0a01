//! The analyst's pages in a real browser. riskd runs on the shipped
//! samples' first day (the attack) with its telemetry listener on; headless
//! Chromium (Debian's `chromium`, which scripts/test.sh installs) opens the
//! leaderboard and the attacker's page; the DOM it built is checked and
//! screenshots are saved under `target/screenshots/`. Ids written as markup
//! show as text and never run.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The browser: `RISKD_TEST_CHROMIUM`, else `chromium` on the PATH.
fn chromium() -> String {
    std::env::var("RISKD_TEST_CHROMIUM").unwrap_or_else(|_| "chromium".to_string())
}

fn browser(args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{} does not run ({e}): run ./scripts/test.sh, which installs it", chromium()));
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The DOM Chromium built for `url`, serialised.
fn dom(url: &str) -> String {
    browser(&["--dump-dom", url])
}

fn screenshot(url: &str, name: &str) -> PathBuf {
    let dir = root().join("target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    browser(&[&format!("--screenshot={}", path.display()), "--window-size=1100,1000", url]);
    assert!(std::fs::metadata(&path).is_ok_and(|m| m.len() > 10_000), "no screenshot at {}", path.display());
    path
}

/// riskd following `input`, serving on a free port; waits until the
/// leaderboard's index is complete and lists `first` first.
fn start(dir: &Path, input: &Path, first: &str) -> (Guard, u16) {
    let port = free_port();
    let config = write_config(dir, input, "follow = true", "flush_interval = \"200ms\"");
    let text =
        std::fs::read_to_string(&config).unwrap().replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(&config, text).unwrap();
    let child = riskd_command(&["run", "--config", &config.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = Guard(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = http_get(&format!("http://127.0.0.1:{port}/v1/entities?top=1"), None)
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .unwrap_or_default();
        if listed["complete"] == true && listed["entities"][0]["id"] == first {
            break;
        }
        assert!(Instant::now() < deadline, "the leaderboard never listed {first} first: {listed}");
        std::thread::sleep(Duration::from_millis(200));
    }
    (guard, port)
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn the_leaderboard_and_the_attackers_page_render_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    // The samples' first day: trudy's attack is the latest thing that happened.
    let text = std::fs::read_to_string(samples()).unwrap();
    let first_day: Vec<&str> = text.lines().filter(|l| l.contains("\"2024-03-01T")).collect();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, first_day.join("\n") + "\n").unwrap();
    let (_riskd, port) = start(dir.path(), &input, "trudy@example.com");
    let base = format!("http://127.0.0.1:{port}");

    let page = dom(&format!("{base}/"));
    let first_row = page.split("<tr class=\"entity\"").nth(1).unwrap_or_else(|| panic!("no entity row: {page}"));
    assert!(first_row.contains("data-id=\"trudy@example.com\""), "the planted attacker is not first: {page}");
    assert!(first_row.contains("band-MEDIUM") && first_row.contains("disarmed"), "{first_row}");
    assert!(first_row.contains("okta_impossible_travel"), "top contributions: {first_row}");
    assert!(first_row.contains("href=\"/entity/user/trudy%40example%2Ecom\""), "{first_row}");
    assert!(count(&page, "<tr class=\"entity\"") >= 5, "{page}");
    screenshot(&format!("{base}/"), "leaderboard.png");

    let url = format!("{base}/entity/user/trudy%40example%2Ecom");
    let page = dom(&url);
    assert!(page.contains("<code id=\"entity-id\">trudy@example.com</code>"), "{page}");
    assert!(page.contains("<svg id=\"score-plot\""), "no plot: {page}");
    let line = page.split("<polyline class=\"score\"").nth(1).unwrap_or_default();
    let points = line.split("points=\"").nth(1).and_then(|p| p.split('"').next()).unwrap_or_default();
    assert!(points.split(' ').count() > 400, "the score line has too few points: {points}");
    assert_eq!(count(&page, "<circle class=\"contribution\""), 6, "a point per contribution: {page}");
    assert!(page.contains("<line class=\"threshold\"") && page.contains("<line class=\"rearm\""), "{page}");
    assert_eq!(count(&page, "<tr class=\"contribution\">"), 6, "{page}");
    assert!(page.contains("okta_impossible_travel/user/trudy@example.com"), "rule state: {page}");
    assert!(page.contains("last flush"), "{page}");
    screenshot(&url, "entity.png");
}

#[test]
fn ids_written_as_markup_are_shown_as_text_and_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let long = format!("{}@example.com", "a".repeat(1000)); // 1,012 bytes: longer ids are set aside
    let nasty = [
        "<script>document.title='pwned'</script>".to_string(),
        "\"><img src=x onerror=\"document.title='pwned'\">".to_string(),
        "' onmouseover='document.title=1".to_string(),
        long.clone(),
    ];
    // Each logs in from New York, then from London an hour later: impossible
    // travel and an IP change, 50 points.
    let mut lines = Vec::new();
    for (i, id) in nasty.iter().enumerate() {
        for (hour, ip, lat, lon) in [(1, "203.0.113.1", 40.7128, -74.006), (2, "203.0.113.2", 51.5074, -0.1278)] {
            lines.push(
                serde_json::json!({
                    "published": format!("2024-05-01T{:02}:0{i}:00Z", hour),
                    "eventType": "user.session.start",
                    "actor": {"alternateId": id},
                    "client": {"ipAddress": ip, "geographicalContext": {"city": "<b>city</b>", "geolocation": {"lat": lat, "lon": lon}}}
                })
                .to_string(),
            );
        }
    }
    lines.sort_by_key(|l| {
        serde_json::from_str::<serde_json::Value>(l).unwrap()["published"].as_str().unwrap().to_string()
    });
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let (_riskd, port) = start(dir.path(), &input, &nasty[3]);
    let base = format!("http://127.0.0.1:{port}");

    let page = dom(&format!("{base}/"));
    assert_eq!(count(&page, "<tr class=\"entity\""), 4, "{page}");
    assert!(!page.contains("pwned</title>") && page.contains("<title>riskd: riskiest entities</title>"), "{page}");
    assert!(!page.contains("<img") && !page.contains("<script"), "markup from an id became an element: {page}");
    assert!(page.contains("&lt;script&gt;document.title='pwned'&lt;/script&gt;"), "shown as text: {page}");
    assert!(page.contains("aaaa…"), "a long id is cut short on the page: {}", page.len());
    for id in &nasty {
        let url = format!("{base}/entity/user/{}", percent_encode(id));
        let page = dom(&url);
        assert!(!page.contains("pwned</title>"), "{page}");
        assert!(!page.contains("<img") && !page.contains("<script") && !page.contains("<b>city"), "{page}");
        assert_eq!(count(&page, "<circle class=\"contribution\""), 2, "{page}");
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}
