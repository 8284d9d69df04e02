//! `$(VAR)` expansion with the exact semantics of Kubernetes'
//! `third_party/forked/golang/expansion`: `$$` escapes a `$`, unknown or
//! unterminated references are kept literally.

/// Expands `$(NAME)` references in `input` using `lookup`.
pub fn expand<'a>(input: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        // A trailing `$` has nothing to operate on: kept as is.
        let Some(next) = after.chars().next() else {
            out.push('$');
            rest = after;
            break;
        };
        match next {
            '$' => {
                out.push('$');
                rest = &after[1..];
            }
            '(' => match after[1..].find(')') {
                Some(close) => {
                    let name = &after[1..1 + close];
                    match lookup(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &after[close + 2..];
                }
                None => {
                    // Unterminated: Kubernetes emits "$(" and continues after it.
                    out.push_str("$(");
                    rest = &after[1..];
                }
            },
            other => {
                out.push('$');
                out.push(other);
                rest = &after[other.len_utf8()..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::expand;
    use std::collections::HashMap;

    fn ex(input: &str) -> String {
        let vars: HashMap<&str, &str> = [
            ("VAR_A", "A"),
            ("VAR_B", "B"),
            ("EMPTY", ""),
            ("NESTED", "$(VAR_A)"),
        ]
        .into_iter()
        .collect();
        expand(input, |k| vars.get(k).copied())
    }

    #[test]
    fn expands_known_references() {
        assert_eq!(ex("$(VAR_A)"), "A");
        assert_eq!(ex("x$(VAR_A)y$(VAR_B)z"), "xAyBz");
        assert_eq!(ex("$(EMPTY)"), "");
        assert_eq!(ex("$(VAR_A)$(VAR_B)"), "AB");
    }

    #[test]
    fn keeps_unknown_references() {
        assert_eq!(ex("$(UNKNOWN)"), "$(UNKNOWN)");
        assert_eq!(ex("a $(UNKNOWN) b"), "a $(UNKNOWN) b");
        assert_eq!(ex("$()"), "$()");
    }

    #[test]
    fn escapes() {
        assert_eq!(ex("$$(VAR_A)"), "$(VAR_A)");
        assert_eq!(ex("$$$(VAR_A)"), "$A");
        assert_eq!(ex("$$$$(VAR_A)"), "$$(VAR_A)");
        assert_eq!(ex("$$"), "$");
        assert_eq!(ex("a$$b"), "a$b");
    }

    #[test]
    fn lone_and_trailing_operators() {
        assert_eq!(ex("$"), "$");
        assert_eq!(ex("abc$"), "abc$");
        assert_eq!(ex("$VAR_A"), "$VAR_A");
        assert_eq!(ex("$é"), "$é");
        assert_eq!(ex("$(VAR_A"), "$(VAR_A");
        assert_eq!(ex("$(VAR_A $(VAR_B)"), "$(VAR_A $(VAR_B)");
    }

    #[test]
    fn no_recursive_expansion() {
        assert_eq!(ex("$(NESTED)"), "$(VAR_A)");
    }
}
