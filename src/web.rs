//! The analyst's pages, served by `riskd run` beside the API: `/` lists
//! the riskiest entities (the leaderboard), `/entity/{type}/{id}` shows one:
//! its score over time drawn from its contributions, the contributions and
//! the rule state kept for it. Server-rendered HTML with its style inline,
//! no script but a refresh; nothing fetched from elsewhere.
//!
//! Entity ids, rule state and every other value come from events, which an
//! attacker writes: everything put in the page goes through [`esc`] (text
//! and attributes) or [`path_segment`] (links).

use crate::event::parse_time_ms;
use crate::scoring::{Explanation, Listing, TypePolicy};
use serde_json::Value;
use std::fmt::Write as _;

/// Seconds between refreshes of a page.
pub const REFRESH_SECONDS: u32 = 15;

/// `s` safe in HTML text and in a quoted attribute.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` as one percent-encoded URL path segment (then safe in an attribute too).
pub fn path_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// At most `max` characters of `s`, with an ellipsis when cut (the page
/// stays readable whatever an id's length; the full value is in the title).
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(max).collect();
    cut.push('…');
    cut
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}\
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}.note{color:#666}\
.band-CRITICAL{background:#b71c1c;color:#fff}.band-HIGH{background:#e65100;color:#fff}.band-MEDIUM{background:#f9a825}\
.band-LOW{background:#c5e1a5}.band-INFO{background:#e3f2fd}code{font-size:12px;word-break:break-all}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\"><title>{}</title><style>{STYLE}</style></head>\
<body>{body}</body></html>\n",
        esc(title)
    )
}

/// The leaderboard page: `types` to filter by, `selected` the one shown.
pub fn leaderboard(listing: &Listing, types: &[String], selected: Option<&str>) -> String {
    let mut b = String::new();
    let _ = write!(b, "<h1>Riskiest entities</h1><form method=\"get\" action=\"/\">Type <select name=\"type\">");
    let _ = write!(b, "<option value=\"\">all</option>");
    for t in types {
        let sel = if Some(t.as_str()) == selected { " selected" } else { "" };
        let _ = write!(b, "<option value=\"{0}\"{sel}>{0}</option>", esc(t));
    }
    let _ = write!(b, "</select> <button type=\"submit\">Show</button></form>");
    let _ = write!(
        b,
        "<p class=\"note\">Scores at {} (the latest event time seen); state as of the last flush; {} entities with risk{}. \
This page refreshes every {REFRESH_SECONDS} s.</p>",
        esc(&listing.now),
        listing.ranked,
        if listing.complete { "" } else { " (the index is still being read from the store)" }
    );
    let _ = write!(
        b,
        "<table id=\"leaderboard\"><thead><tr><th>#</th><th>Type</th><th>Entity</th><th>Score</th><th>Band</th>\
<th>Armed</th><th>Last alert</th><th>Top contributions</th></tr></thead><tbody>"
    );
    for (i, e) in listing.entities.iter().enumerate() {
        let band = e.band.map_or("", |s| s.as_str());
        let top: Vec<String> = e.top.iter().map(|c| format!("{} {} pts", esc(&c.rule_id), c.decayed_points)).collect();
        let _ = write!(
            b,
            "<tr class=\"entity\" data-type=\"{t}\" data-id=\"{id}\"><td class=\"num\">{n}</td><td>{t}</td>\
<td><a href=\"/entity/{tp}/{ip}\" title=\"{id}\">{shown}</a></td><td class=\"num score\">{score}</td>\
<td class=\"band-{band}\">{band}</td><td>{armed}</td><td>{last}</td><td>{top}</td></tr>",
            n = i + 1,
            t = esc(&e.type_),
            id = esc(&e.id),
            tp = path_segment(&e.type_),
            ip = path_segment(&e.id),
            shown = esc(&clip(&e.id, 80)),
            score = e.score,
            armed = if e.armed { "armed" } else { "disarmed" },
            last = esc(e.last_alert.as_deref().unwrap_or("")),
            top = top.join("<br>"),
        );
    }
    b.push_str("</tbody></table>");
    if listing.entities.is_empty() {
        b.push_str("<p>No entity has risk yet.</p>");
    }
    page("riskd: riskiest entities", &b)
}

/// The score of contributions `(time ms, points, rule)` at `t`, decayed by `policy`.
fn score_at(contributions: &[(i64, f64, String)], policy: &TypePolicy, t: i64) -> f64 {
    contributions.iter().filter(|c| c.0 <= t).map(|c| policy.decayed(c.1, t - c.0)).sum()
}

/// The score over time as SVG: from a day before `now`, or from a little
/// before the first contribution when that is earlier (at most 90 days),
/// to `now`, with the threshold and re-arm lines and a point per contribution.
fn plot(x: &Explanation) -> String {
    const W: f64 = 860.0;
    const H: f64 = 260.0;
    const L: f64 = 50.0;
    const R: f64 = 10.0;
    const T: f64 = 10.0;
    const B: f64 = 30.0;
    let day = 86_400_000i64;
    let now = parse_time_ms(&Value::from(x.now.as_str())).unwrap_or(0);
    let policy = TypePolicy {
        half_life_ms: (x.half_life_hours * 3_600_000.0).round().max(1.0) as i64,
        ..TypePolicy::with_threshold(x.threshold)
    };
    let mut contributions: Vec<(i64, f64, String)> = x
        .contributions
        .iter()
        .filter_map(|c| Some((parse_time_ms(&Value::from(c.event_time.as_str()))?, c.points, c.rule_id.clone())))
        .filter(|c| c.0 <= now)
        .collect();
    contributions.sort_by_key(|c| c.0);
    let earliest = contributions.first().map_or(now, |c| c.0);
    let start = (now - day).min(earliest - ((now - earliest) / 10).max(3_600_000)).max(now - 90 * day);
    let span = (now - start).max(1) as f64;
    let mut times: Vec<i64> = (0..=400).map(|i| start + (span * f64::from(i) / 400.0) as i64).collect();
    for c in &contributions {
        if c.0 > start {
            times.extend([c.0 - 1, c.0]);
        }
    }
    times.sort_unstable();
    times.dedup();
    let points: Vec<(i64, f64)> = times.iter().map(|&t| (t, score_at(&contributions, &policy, t))).collect();
    let top = points.iter().map(|p| p.1).fold(x.threshold * 1.2, f64::max) * 1.05;
    let px = |t: i64| L + (t - start) as f64 / span * (W - L - R);
    let py = |s: f64| T + (1.0 - s / top) * (H - T - B);
    let mut svg = format!(
        "<svg id=\"score-plot\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"score over time\">\
<rect x=\"{L}\" y=\"{T}\" width=\"{}\" height=\"{}\" fill=\"#fafafa\" stroke=\"#ccc\"/>",
        W - L - R,
        H - T - B
    );
    for (value, class, colour, label) in
        [(x.threshold, "threshold", "#c62828", "threshold"), (x.rearm_below, "rearm", "#757575", "re-arms below")]
    {
        let y = py(value);
        let _ = write!(
            svg,
            "<line class=\"{class}\" x1=\"{L}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"{colour}\" stroke-dasharray=\"6 4\"/>\
<text x=\"{}\" y=\"{:.1}\" font-size=\"11\" fill=\"{colour}\" text-anchor=\"end\">{label} {value}</text>",
            W - R,
            W - R - 4.0,
            y - 3.0
        );
    }
    let line: Vec<String> = points.iter().map(|&(t, s)| format!("{:.1},{:.1}", px(t), py(s))).collect();
    let _ = write!(
        svg,
        "<polyline class=\"score\" fill=\"none\" stroke=\"#1565c0\" stroke-width=\"1.5\" points=\"{}\"/>",
        line.join(" ")
    );
    for c in contributions.iter().filter(|c| c.0 >= start) {
        let s = score_at(&contributions, &policy, c.0);
        let _ = write!(
            svg,
            "<circle class=\"contribution\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#ef6c00\"><title>{} +{} at {}</title></circle>",
            px(c.0),
            py(s),
            esc(&c.2),
            c.1,
            esc(&crate::event::format_time_ms(c.0))
        );
    }
    for (t, label) in [(start, crate::event::format_time_ms(start)), (now, x.now.clone())] {
        let anchor = if t == start { "start" } else { "end" };
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"{anchor}\">{}</text>",
            px(t),
            H - 10.0,
            esc(&label)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{:.0}</text></svg>",
        L - 4.0,
        T + 10.0,
        top
    );
    svg
}

/// An entity's page.
pub fn entity(x: &Explanation) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        "<p><a href=\"/\">← riskiest entities</a></p><h1>{} <code id=\"entity-id\">{}</code></h1>",
        esc(&x.entity.type_),
        esc(&x.entity.id)
    );
    let _ = write!(
        b,
        "<p>Score <b id=\"score\">{}</b> at {} (threshold {}, re-arms below {}, half-life {} h). {}</p>",
        x.score,
        esc(&x.now),
        x.threshold,
        x.rearm_below,
        x.half_life_hours,
        esc(&x.armed_explained)
    );
    if let Some(p) = &x.peak {
        let _ = write!(b, "<p>Peak {} at {}.</p>", p.score, esc(&p.at));
    }
    let _ = write!(
        b,
        "<p class=\"note\">State as of the last flush. This page refreshes every {REFRESH_SECONDS} s.</p>{}",
        plot(x)
    );
    let _ = write!(
        b,
        "<h2>Contributions ({})</h2><table id=\"contributions\"><thead><tr><th>Rule</th><th>Points</th><th>Now</th>\
<th>At</th><th>Alert</th></tr></thead><tbody>",
        x.contributions.len()
    );
    for c in &x.contributions {
        let _ = write!(
            b,
            "<tr class=\"contribution\"><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td><code>{}</code></td></tr>",
            esc(&c.rule_id),
            c.points,
            c.decayed_points,
            esc(&c.event_time),
            esc(&c.alert_id)
        );
    }
    let _ = write!(
        b,
        "</tbody></table><h2>Rule state ({})</h2><table id=\"rule-state\"><thead><tr><th>Key</th><th>Rule</th>\
<th>Values</th><th>Expiry</th></tr></thead><tbody>",
        x.rule_state.len()
    );
    for r in &x.rule_state {
        let mut values = Vec::new();
        if r.count != 0 {
            values.push(format!("count {}", r.count));
        }
        if !r.set.is_empty() {
            let set: Vec<&str> = r.set.iter().map(String::as_str).collect();
            values.push(format!("set {}", clip(&set.join(", "), 400)));
        }
        if let Some(d) = &r.dict {
            values.push(clip(&Value::Object(d.clone()).to_string(), 400));
        }
        if let Some(s) = &r.summary {
            values.push(s.clone());
        }
        let values: Vec<String> = values.iter().map(|v| format!("<code>{}</code>", esc(v))).collect();
        let expiry = match (&r.expires_at, r.live) {
            (None, _) => "none".to_string(),
            (Some(at), true) => format!("expires {}", esc(at)),
            (Some(at), false) => format!("expired at {} (reads as empty)", esc(at)),
        };
        let _ = write!(
            b,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{expiry}</td></tr>",
            esc(&clip(&r.key, 200)),
            esc(&r.rule_id),
            values.join("<br>")
        );
    }
    b.push_str("</tbody></table>");
    page(&format!("riskd: {} {}", x.entity.type_, clip(&x.entity.id, 80)), &b)
}

/// An error as a page.
pub fn error(status: u16, message: &str) -> String {
    page("riskd", &format!("<p><a href=\"/\">← riskiest entities</a></p><h1>{status}</h1><p>{}</p>", esc(message)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_in_text_attributes_and_links() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(path_segment("a/b <c>\"?#"), "a%2Fb%20%3Cc%3E%22%3F%23");
        assert_eq!(clip("abcdef", 3), "abc…");
        let listing = Listing {
            now: "2024-03-01T00:00:00.000Z".into(),
            ranked: 1,
            complete: true,
            entities: vec![crate::scoring::Listed {
                type_: "user".into(),
                id: "<script>alert(1)</script>\"onmouseover=\"x".into(),
                score: 1.0,
                band: None,
                threshold: 100.0,
                armed: true,
                last_alert: None,
                top: Vec::new(),
            }],
        };
        let html = leaderboard(&listing, &["user".into()], None);
        assert!(!html.contains("<script>alert(1)"), "{html}");
        assert!(!html.contains("\"onmouseover=\""), "{html}");
        assert!(html.contains("href=\"/entity/user/%3Cscript%3Ealert%281%29%3C%2Fscript%3E%22onmouseover%3D%22x\""));
    }
}
