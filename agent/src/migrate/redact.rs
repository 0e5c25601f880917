//! Keeps the connection string out of every message this module produces.
//!
//! Errors from sqlx, libpq tools and the OS are turned into strings through
//! a [`Redactor`] before they reach an error, a log line or a report: the
//! URL, and the password in every spelling it may appear in (as written,
//! percent-decoded, as a `password=` parameter), become `<redacted>`.

use super::config::DbUrl;

pub const REDACTED: &str = "<redacted>";

/// Replaces the secrets of one connection string.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    /// Longest first, so that the URL is replaced before its parts.
    needles: Vec<String>,
}

impl Redactor {
    pub fn new(url: &DbUrl) -> Redactor {
        let raw = url.expose();
        let mut needles = vec![raw.to_owned()];
        if let Ok(parsed) = url::Url::parse(raw) {
            if let Some(p) = parsed.password() {
                needles.push(p.to_owned());
                if let Ok(d) = percent_decode(p) {
                    needles.push(d);
                }
            }
            for (k, v) in parsed.query_pairs() {
                if k == "password" {
                    needles.push(v.into_owned());
                }
            }
            // sqlx and libpq may print the URL re-serialized.
            needles.push(parsed.as_str().to_owned());
        }
        needles.retain(|n| !n.is_empty());
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        needles.dedup();
        Redactor { needles }
    }

    /// `text` with every secret replaced.
    pub fn clean(&self, text: &str) -> String {
        let mut s = text.to_owned();
        for n in &self.needles {
            if s.contains(n.as_str()) {
                s = s.replace(n.as_str(), REDACTED);
            }
        }
        s
    }
}

/// `%XX` escapes decoded (no `+` rule: this is for URL parts, not forms).
pub fn percent_decode(s: &str) -> Result<String, std::string::FromUtf8Error> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out)
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_url_and_password_spellings() {
        let r = Redactor::new(&DbUrl::new("postgres://u:p%40ss-w0rd@h:5/db?password=other-Secret"));
        let msg =
            "failed for postgres://u:p%40ss-w0rd@h:5/db?password=other-Secret: p@ss-w0rd p%40ss-w0rd other-Secret";
        let c = r.clean(msg);
        assert!(!c.contains("w0rd") && !c.contains("other-Secret"), "{c}");
    }
}
