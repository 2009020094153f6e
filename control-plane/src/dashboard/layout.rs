//! What every page shares: the frame with its navigation, the sign-in and error pages, and
//! how values are written (enum names as words, times, ages).

use super::{Caller, PageResult};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse};
use maud::{html, Markup, DOCTYPE};
use std::time::Duration;

/// A whole page: header with navigation, `body`, and the live stream to follow, if any.
pub(super) fn page(
    title: &str,
    caller: Option<&Caller>,
    live: Option<&str>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Berth" }
                link rel="stylesheet" href="/static/style.css";
            }
            body data-live=[live] {
                header {
                    span.brand { "Berth" }
                    @if let Some(caller) = caller {
                        a href="/agents" { "Agents" }
                        a href="/nodes" { "Nodes" }
                        a href="/requests" { "Replay queue" }
                        span.who { "signed in: " (caller.principal.scope_name()) " token" }
                        form method="post" action="/logout" { button #logout type="submit" { "Sign out" } }
                    }
                }
                main { (body) }
                script src="/static/live.js" {}
            }
        }
    }
}

pub(super) fn html_page(markup: Markup) -> PageResult {
    Ok(Html(markup.into_string()).into_response())
}

/// The sign-in page, with a note (why the last attempt failed).
pub(super) fn login(note: Option<&str>) -> Markup {
    page(
        "Sign in",
        None,
        None,
        html! {
            div.login {
                h1 { "Sign in" }
                @if let Some(note) = note { div.flash { (note) } }
                p.muted { "An API token: an admin token, or a read-only one (`berth token create --scope read-only`), which sees everything and changes nothing." }
                form method="post" action="/login" {
                    label for="token" { "API token" }
                    input #token type="password" name="token" autocomplete="off" autofocus;
                    button.primary #signin type="submit" { "Sign in" }
                }
            }
        },
    )
}

/// A page saying why something could not be shown or done.
pub(super) fn error(code: StatusCode, message: &str) -> Markup {
    page(
        "Error",
        None,
        None,
        html! {
            h1 { (code.as_u16()) " " (code.canonical_reason().unwrap_or("error")) }
            div.flash #error { (message) }
            p { a href="/agents" { "Back to the agents" } }
        },
    )
}

/// `REPLICA_STATE_RUNNING` → `running`.
pub(super) fn word(name: &str) -> String {
    let parts: Vec<&str> = name.split('_').collect();
    let skip = match parts.as_slice() {
        [_, _, _, ..] if parts[1] == "STATE" || parts[1] == "STATUS" => 2,
        _ => 1,
    };
    parts[skip..].join("-").to_ascii_lowercase()
}

pub(super) fn time(t: Option<&pbjson_types::Timestamp>) -> String {
    t.map(|t| {
        let at = std::time::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, 0);
        humantime::format_rfc3339_seconds(at).to_string()
    })
    .unwrap_or_else(|| "-".into())
}

pub(super) fn age(t: Option<&pbjson_types::Timestamp>) -> String {
    let Some(t) = t else { return "-".into() };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let secs = (now - t.seconds).max(0) as u64;
    humantime::format_duration(Duration::from_secs(secs))
        .to_string()
        .split(' ')
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_names_read_as_words() {
        assert_eq!(word("REPLICA_STATE_RUNNING"), "running");
        assert_eq!(word("NODE_STATUS_READY"), "ready");
        assert_eq!(word("BREAKER_STATE_HALF_OPEN"), "half-open");
        assert_eq!(word("REQUEST_STATE_DEAD"), "dead");
    }

    #[test]
    fn every_value_is_escaped() {
        let page = error(StatusCode::BAD_REQUEST, "<script>alert(1)</script>").into_string();
        assert!(!page.contains("<script>alert") && page.contains("&lt;script&gt;"));
    }
}
