//! Splits a migration's SQL into statements for the dry-run plan.
//!
//! This is for showing what would run, statement by statement; execution
//! always hands the whole file to the driver (as sqlx does), so a wrong
//! split here can only make a plan harder to read, never change what runs.
//! It knows enough SQL lexing to not split inside quotes (`'...'`, `"..."`,
//! PostgreSQL's `E'...'` and `$tag$...$tag$`), comments (`--`, nested
//! `/* */`), and the bodies of `CREATE TRIGGER ... BEGIN ... END` (SQLite)
//! and `BEGIN ATOMIC ... END` (PostgreSQL), whose inner semicolons do not end
//! the statement.

/// Statements in `sql`, trimmed, without their final `;`; comments are kept
/// with the statement that follows them, and comment-only text is dropped.
pub fn split_statements(sql: &str) -> Vec<String> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    // Word state: block depth counts BEGIN/CASE against END inside CREATE
    // statements, where a body may hold semicolons.
    let mut first_word: Option<String> = None;
    let mut depth: i32 = 0;
    let mut has_code = false;
    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut nest = 1;
                i += 2;
                while i < b.len() && nest > 0 {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        nest += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        nest -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' | b'"' | b'`' => {
                has_code = true;
                // E'...' strings take backslash escapes.
                let escapes = c == b'\''
                    && i > 0
                    && matches!(b[i - 1], b'E' | b'e')
                    && !is_word(b.get(i.wrapping_sub(2)).copied());
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == c {
                        // A doubled quote is an escaped quote.
                        if b.get(i + 1) == Some(&c) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'$' if !is_word(i.checked_sub(1).map(|p| b[p])) => {
                has_code = true;
                // $tag$ ... $tag$ (tag may be empty).
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|&x| !(x.is_ascii_alphanumeric() || x == b'_'));
                match tag_end.map(|p| i + 1 + p) {
                    Some(e) if b[e] == b'$' && !b[i + 1..e].first().is_some_and(|d| d.is_ascii_digit()) => {
                        let tag = &b[i..=e];
                        let body = e + 1;
                        match find(&b[body..], tag) {
                            Some(p) => i = body + p + tag.len(),
                            None => i = b.len(),
                        }
                    }
                    _ => i += 1,
                }
            }
            b';' => {
                if depth <= 0 {
                    push(&mut out, &sql[start..i], has_code);
                    start = i + 1;
                    first_word = None;
                    depth = 0;
                    has_code = false;
                }
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                has_code = true;
                let s = i;
                while i < b.len() && is_word(Some(b[i])) {
                    i += 1;
                }
                let word = sql[s..i].to_ascii_uppercase();
                match &first_word {
                    None => first_word = Some(word),
                    Some(f) if f == "CREATE" => match word.as_str() {
                        "BEGIN" | "CASE" => depth += 1,
                        "END" => depth -= 1,
                        _ => {}
                    },
                    Some(_) => {}
                }
            }
            c => {
                if !c.is_ascii_whitespace() {
                    has_code = true;
                }
                i += 1;
            }
        }
    }
    push(&mut out, &sql[start..], has_code);
    out
}

fn is_word(c: Option<u8>) -> bool {
    c.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn push(out: &mut Vec<String>, stmt: &str, has_code: bool) {
    let s = stmt.trim();
    if has_code && !s.is_empty() {
        out.push(s.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::split_statements;

    #[test]
    fn splits_plain_statements() {
        assert_eq!(
            split_statements("CREATE TABLE a (x int);\n\nINSERT INTO a VALUES (1);\n"),
            vec!["CREATE TABLE a (x int)", "INSERT INTO a VALUES (1)"]
        );
    }

    #[test]
    fn keeps_quoted_and_commented_semicolons() {
        let sql = "INSERT INTO t VALUES ('a;b', \"c;d\", E'it\\'s;'); -- trailing; comment\n/* x; /* nested; */ y; */ SELECT 1;";
        let s = split_statements(sql);
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s[0].starts_with("INSERT"));
        assert!(s[1].ends_with("SELECT 1"), "{s:?}");
    }

    #[test]
    fn dollar_quoted_function_bodies() {
        let sql = "CREATE FUNCTION f() RETURNS int AS $body$ BEGIN RETURN 1; END; $body$ LANGUAGE plpgsql;\nCREATE FUNCTION g() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql; SELECT $1::int";
        let s = split_statements(sql);
        assert_eq!(s.len(), 3, "{s:?}");
    }

    #[test]
    fn trigger_bodies() {
        let sql = "CREATE TRIGGER tr AFTER INSERT ON a BEGIN UPDATE b SET n = CASE WHEN n > 0 THEN n + 1 ELSE 1 END; DELETE FROM c; END;\nSELECT 2;";
        let s = split_statements(sql);
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s[0].ends_with("END"));
    }

    #[test]
    fn comment_only_text_is_not_a_statement() {
        assert!(split_statements("-- nothing here\n/* or here */\n").is_empty());
        assert_eq!(
            split_statements("-- no-transaction\nCREATE INDEX CONCURRENTLY i ON t (x);").len(),
            1
        );
    }
}
