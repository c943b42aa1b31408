//! Label and field selectors with kube-apiserver's syntax and matching rules.

use serde_json::Value;

use super::resources::ResourceDef;
use super::status::ApiError;

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
}

fn lex(input: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = input.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '!' | '=' => {
                chars.next();
                let doubled = chars.peek() == Some(&'=');
                if doubled {
                    chars.next();
                }
                tokens.push(match (c, doubled) {
                    ('!', true) => Token::NotEq,
                    ('!', false) => Token::Not,
                    ('=', true) => Token::DoubleEq,
                    _ => Token::Eq,
                });
            }
            '>' | '<' | '(' | ')' | ',' => {
                chars.next();
                tokens.push(match c {
                    '>' => Token::Gt,
                    '<' => Token::Lt,
                    '(' => Token::Open,
                    ')' => Token::Close,
                    _ => Token::Comma,
                });
            }
            _ => {
                let mut ident = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || "!=<>(),".contains(c) {
                        break;
                    }
                    ident.push(c);
                    chars.next();
                }
                tokens.push(Token::Ident(ident));
            }
        }
    }
    tokens
}

fn parse_error(detail: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("unable to parse requirement: {detail}"))
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63 characters.
fn validate_key(key: &str) -> Result<(), ApiError> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(parse_error(format!(
                "invalid label key {key:?}: prefix part must be a lowercase RFC 1123 subdomain"
            )));
        }
    }
    if name.is_empty() || !valid_name_part(name) {
        return Err(parse_error(format!(
            "invalid label key {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        )));
    }
    Ok(())
}

fn valid_name_part(s: &str) -> bool {
    s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn validate_value(value: &str) -> Result<(), ApiError> {
    if value.is_empty() || valid_name_part(value) {
        Ok(())
    } else {
        Err(parse_error(format!(
            "invalid label value: {value:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        )))
    }
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn ident(&mut self, what: &str) -> Result<String, ApiError> {
        match self.next() {
            Some(Token::Ident(s)) => Ok(s),
            other => Err(parse_error(format!("found {other:?}, expected: {what}"))),
        }
    }

    /// A value after `=`, `==` or `!=`: may be empty (`a=` selects `a: ""`).
    fn single_value(&mut self) -> Result<String, ApiError> {
        match self.peek() {
            Some(Token::Ident(_)) => self.ident("a value"),
            None | Some(Token::Comma) => Ok(String::new()),
            Some(other) => Err(parse_error(format!("found {other:?}, expected: a value"))),
        }
    }

    fn value_set(&mut self) -> Result<Vec<String>, ApiError> {
        if self.next() != Some(Token::Open) {
            return Err(parse_error("expected: '('"));
        }
        let mut values = Vec::new();
        loop {
            match self.next() {
                Some(Token::Ident(v)) => {
                    validate_value(&v)?;
                    values.push(v);
                    match self.next() {
                        Some(Token::Comma) => {}
                        Some(Token::Close) => break,
                        other => {
                            return Err(parse_error(format!(
                                "found {other:?}, expected: ',' or ')'"
                            )));
                        }
                    }
                }
                Some(Token::Close) if values.is_empty() => break,
                other => return Err(parse_error(format!("found {other:?}, expected: a value"))),
            }
        }
        if values.is_empty() {
            return Err(parse_error(
                "for 'in', 'notin' operators, values set can't be empty",
            ));
        }
        Ok(values)
    }

    fn requirement(&mut self) -> Result<Requirement, ApiError> {
        if self.peek() == Some(&Token::Not) {
            self.next();
            let key = self.ident("a label key after '!'")?;
            validate_key(&key)?;
            return Ok(Requirement::NotExists(key));
        }
        let key = self.ident("a label key")?;
        validate_key(&key)?;
        let req = match self.peek() {
            None | Some(Token::Comma) => Requirement::Exists(key),
            Some(Token::Eq | Token::DoubleEq) => {
                self.next();
                let v = self.single_value()?;
                validate_value(&v)?;
                Requirement::In(key, vec![v])
            }
            Some(Token::NotEq) => {
                self.next();
                let v = self.single_value()?;
                validate_value(&v)?;
                Requirement::NotIn(key, vec![v])
            }
            Some(Token::Gt | Token::Lt) => {
                let gt = self.next() == Some(Token::Gt);
                let v = self.ident("an integer")?;
                let n: i64 = v.parse().map_err(|_| {
                    parse_error(format!(
                        "for 'Gt', 'Lt' operators, the value must be an integer: {v:?}"
                    ))
                })?;
                if gt {
                    Requirement::GreaterThan(key, n)
                } else {
                    Requirement::LessThan(key, n)
                }
            }
            Some(Token::Ident(op)) if op == "in" || op == "notin" => {
                let notin = op == "notin";
                self.next();
                let values = self.value_set()?;
                if notin {
                    Requirement::NotIn(key, values)
                } else {
                    Requirement::In(key, values)
                }
            }
            Some(other) => {
                return Err(parse_error(format!(
                    "found {other:?}, expected: in, notin, =, ==, !=, gt, lt"
                )));
            }
        };
        Ok(req)
    }
}

impl LabelSelector {
    /// Parses the `labelSelector` query value; a syntax error is a 400 like the server's.
    pub fn parse(input: &str) -> Result<Self, ApiError> {
        let mut parser = Parser {
            tokens: lex(input),
            pos: 0,
        };
        let mut reqs = Vec::new();
        if parser.tokens.is_empty() {
            return Ok(Self(reqs));
        }
        loop {
            reqs.push(parser.requirement()?);
            match parser.next() {
                None => break,
                Some(Token::Comma) => {}
                Some(other) => return Err(parse_error(format!("found {other:?}, expected: ','"))),
            }
        }
        Ok(Self(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object with these `metadata.labels` is selected.
    pub fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
            Requirement::In(k, vs) => get(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|v| vs.iter().all(|x| x != v)),
            Requirement::GreaterThan(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            Requirement::LessThan(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        })
    }
}

/// A parsed `fieldSelector`, checked against the resource's supported field labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<FieldTerm>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    /// JSON pointer of the field; `metadata.name` and `metadata.namespace` included.
    pointer: String,
    default: &'static str,
    value: String,
    equal: bool,
}

/// Splits on unescaped `sep`, keeping escapes for the next step.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            parts.last_mut().expect("non-empty").extend(['\\', c]);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(String::new());
        } else {
            parts.last_mut().expect("non-empty").push(c);
        }
    }
    if escaped {
        parts.last_mut().expect("non-empty").push('\\');
    }
    parts
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                Some(e) => return Err(format!("invalid escape sequence: \\{e}")),
                None => return Err("unterminated escape sequence".into()),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

impl FieldSelector {
    /// Parses `fieldSelector` for `res`: a bad term or an unsupported label is a 400 worded
    /// like the server's (`field label not supported: ...`).
    pub fn parse(input: &str, res: &ResourceDef, label_selector: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        if input.trim().is_empty() {
            return Ok(Self(terms));
        }
        for term in split_unescaped(input, ',') {
            let invalid = || {
                ApiError::bad_request(format!(
                    "invalid selector: '{input}'; can't understand '{term}'"
                ))
            };
            let (key, value, equal) = if let Some(i) = find_unescaped(&term, "!=") {
                (&term[..i], &term[i + 2..], false)
            } else if let Some(i) = find_unescaped(&term, "==") {
                (&term[..i], &term[i + 2..], true)
            } else if let Some(i) = find_unescaped(&term, "=") {
                (&term[..i], &term[i + 1..], true)
            } else {
                return Err(invalid());
            };
            let key = key.trim();
            let value = unescape(value)
                .map_err(|e| ApiError::bad_request(format!("invalid field selector: {e}")))?;
            let (pointer, default) = match key {
                "metadata.name" => ("/metadata/name".to_string(), ""),
                "metadata.namespace" => ("/metadata/namespace".to_string(), ""),
                other => match res.field_label(other) {
                    Some(f) => (f.pointer.to_string(), f.default),
                    None => {
                        return Err(ApiError::bad_request(format!(
                            "Unable to find \"{}\" that match label selector \"{label_selector}\", field selector \"{input}\": field label not supported: {other}",
                            res.gvr()
                        )));
                    }
                },
            };
            terms.push(FieldTerm {
                pointer,
                default,
                value,
                equal,
            });
        }
        Ok(Self(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|t| {
            let actual = match object.pointer(&t.pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => t.default.to_string(),
                Some(other) => other.to_string(),
            };
            (actual == t.value) == t.equal
        })
    }
}

fn find_unescaped(s: &str, op: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if s[i..].starts_with(op) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Both selectors of one request.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub fn parse(
        labels: Option<&str>,
        fields: Option<&str>,
        res: &ResourceDef,
    ) -> Result<Self, ApiError> {
        let label_text = labels.unwrap_or("");
        Ok(Self {
            labels: LabelSelector::parse(label_text)?,
            fields: FieldSelector::parse(fields.unwrap_or(""), res, label_text)?,
        })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        self.labels.matches(labels) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fakeapi::resources::RESOURCES;

    fn labels(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn label_selector_operators() {
        let l = labels(json!({"app": "web", "tier": "front", "n": "7"}));
        let m = |s: &str| sel(s).matches(Some(&l));
        assert!(m(""));
        assert!(m("app=web") && m("app==web") && m("app = web"));
        assert!(!m("app=db") && m("app!=db") && !m("app!=web"));
        assert!(m("missing!=x"), "!= selects objects without the key");
        assert!(m("app in (db, web)") && !m("app in (db)"));
        assert!(m("app notin (db)") && !m("app notin (web,db)") && m("missing notin (x)"));
        assert!(m("app") && !m("missing") && m("!missing") && !m("!app"));
        assert!(m("app=web,tier=front") && !m("app=web,tier=back"));
        assert!(m("n>5") && !m("n<5") && m("n < 8") && !m("app>1"));
        assert!(m("example.com/x!=1") && !m("example.com/x"));
        assert!(
            !sel("app=").matches(Some(&l))
                && sel("app=").matches(Some(&labels(json!({"app": ""}))))
        );
        assert!(m("app in (web),!missing,tier notin (back)"));
        assert!(sel("a").matches(Some(&labels(json!({"a": ""})))));
        assert!(!sel("a").matches(None) && sel("!a").matches(None));
    }

    #[test]
    fn label_selector_errors_are_bad_requests() {
        for bad in [
            "app in web",
            "app in ()",
            "=x",
            "app=a,",
            "app ~ x",
            "-bad=x",
            "app=x y",
            "n>x",
            "app in (a b)",
            "a/=b",
            "!",
        ] {
            let err = LabelSelector::parse(bad).expect_err(bad);
            assert_eq!(err.code, 400, "{bad}");
            assert!(
                err.message.starts_with("unable to parse requirement"),
                "{bad}: {}",
                err.message
            );
        }
    }

    #[test]
    fn field_selectors_for_pods() {
        let pods = &RESOURCES[0];
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let m = |s: &str| {
            FieldSelector::parse(s, pods, "")
                .unwrap_or_else(|e| panic!("{e}"))
                .matches(&pod)
        };
        assert!(m("spec.nodeName=n1") && m("spec.nodeName==n1") && !m("spec.nodeName!=n1"));
        assert!(m(
            "metadata.name=p,metadata.namespace=ns,status.phase=Running"
        ));
        assert!(!m("status.phase=Pending") && m("status.phase!=Pending"));
        assert!(
            m("spec.hostNetwork=false"),
            "absent booleans compare as false"
        );
        assert!(!m("spec.nodeName=") && m("spec.nodeName!="));
        let unscheduled = json!({"metadata": {"name": "q"}, "spec": {}});
        assert!(
            FieldSelector::parse("spec.nodeName=", pods, "")
                .unwrap_or_default()
                .matches(&unscheduled)
        );
    }

    #[test]
    fn unsupported_field_label_is_the_servers_400() {
        let err =
            FieldSelector::parse("spec.foo=bar", &RESOURCES[0], "app=x").expect_err("unsupported");
        assert_eq!(err.code, 400);
        assert_eq!(
            err.message,
            "Unable to find \"/v1, Resource=pods\" that match label selector \"app=x\", field selector \"spec.foo=bar\": field label not supported: spec.foo"
        );
        let lease = RESOURCES
            .iter()
            .find(|r| r.plural == "leases")
            .expect("leases");
        assert!(FieldSelector::parse("spec.nodeName=x", lease, "").is_err());
        assert_eq!(
            FieldSelector::parse("nonsense", lease, "").map_err(|e| e.code),
            Err(400)
        );
    }

    #[test]
    fn field_selector_escapes() {
        let pods = &RESOURCES[0];
        let pod = json!({"metadata": {"name": "a,b=c"}});
        let s = FieldSelector::parse(r"metadata.name=a\,b\=c", pods, "").expect("escaped");
        assert!(s.matches(&pod));
    }
}
