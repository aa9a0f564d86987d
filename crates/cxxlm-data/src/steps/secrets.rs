use base64::Engine;
use regex::Regex;

use super::pii::replace_spans;
use super::{Counters, Step, Verdict};
use crate::config::{SecretAction, SecretsConfig};
use crate::document::Document;

/// detect-secrets' pattern plugins: (name, pattern, capture group holding the secret).
const PATTERNS: &[(&str, &str, usize)] = &[
    (
        "aws_access_key",
        r"(?:A3T[A-Z0-9]|ABIA|ACCA|AKIA|ASIA)[0-9A-Z]{16}",
        0,
    ),
    (
        "aws_secret_key",
        r#"(?i)aws.{0,20}?(?:key|pwd|pw|password|pass|token).{0,20}?['"]([0-9a-zA-Z/+]{40})['"]"#,
        1,
    ),
    (
        "github_token",
        r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9_]{36}",
        0,
    ),
    (
        "gitlab_token",
        r"(?:glpat|gldt|glft|glsoat|glrt|glcbt|glptt|glagent|gloas)-[A-Za-z0-9_\-]{20,50}|GR1348941[A-Za-z0-9_\-]{20,50}",
        0,
    ),
    ("slack_token", r"xox(?:a|b|p|o|s|r)-(?:\d+-)+[a-z0-9]+", 0),
    (
        "slack_webhook",
        r"https://hooks\.slack\.com/services/T[a-zA-Z0-9_]+/B[a-zA-Z0-9_]+/[a-zA-Z0-9_]+",
        0,
    ),
    ("stripe_key", r"(?:r|s)k_live_[0-9a-zA-Z]{24}", 0),
    (
        "openai_key",
        r"sk-[A-Za-z0-9_-]*[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}",
        0,
    ),
    (
        "jwt",
        r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.?[A-Za-z0-9_.+/=-]*",
        0,
    ),
    (
        "private_key",
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?s:.)*?-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|PuTTY-User-Key-File-2",
        0,
    ),
    (
        "basic_auth",
        r"://[^\s:/?#\[\]@!$&'()*+,;=]+:([^\s:/?#\[\]@!$&'()*+,;=]+)@",
        1,
    ),
];

const SEQUENCES: [&str; 4] = [
    "ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/",
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJKLMNOPQRSTUVWXYZ+/",
    "0123456789ABCDEFABCDEF",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ=/",
];

/// Keys and credentials, found as detect-secrets finds them, then redacted to `<KEY>`
/// or the file dropped. Quoted strings are judged by Shannon entropy (base64 charset
/// over 4.5 bits/char, hex over 3.0, all-digit strings discounted as detect-secrets
/// does), after its false-positive filters: UUIDs, sequential strings
/// (`ABCDEF...`, `0123...`), and strings with no digit at all (identifiers, words and
/// paths; a random key of 20+ base64 characters without a digit is vanishingly rare).
pub struct Secrets {
    config: SecretsConfig,
    patterns: Vec<(&'static str, Regex, usize)>,
    quoted: Regex,
    uuid: Regex,
}

impl Secrets {
    pub fn new(config: SecretsConfig) -> Self {
        Secrets {
            config,
            patterns: PATTERNS
                .iter()
                .map(|(n, p, g)| (*n, Regex::new(p).expect("static pattern"), *g))
                .collect(),
            quoted: Regex::new(r#""([A-Za-z0-9+/=_-]{9,})"|'([A-Za-z0-9+/=_-]{9,})'"#)
                .expect("static pattern"),
            uuid: Regex::new(r"(?i)^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
                .expect("static pattern"),
        }
    }

    /// Every finding: (start, end, plugin).
    pub fn find(&self, text: &str) -> Vec<(usize, usize, &'static str)> {
        let mut found = Vec::new();
        for (name, re, group) in &self.patterns {
            for c in re.captures_iter(text) {
                let Some(m) = c.get(*group) else { continue };
                if *name == "jwt" && !is_jwt(m.as_str()) {
                    continue;
                }
                found.push((m.start(), m.end(), *name));
            }
        }
        for c in self.quoted.captures_iter(text) {
            let Some(m) = c.get(1).or_else(|| c.get(2)) else {
                continue;
            };
            if let Some(kind) = self.high_entropy(m.as_str()) {
                found.push((m.start(), m.end(), kind));
            }
        }
        found
    }

    fn high_entropy(&self, s: &str) -> Option<&'static str> {
        if !s.bytes().any(|b| b.is_ascii_digit()) || self.uuid.is_match(s) {
            return None;
        }
        let upper = s.to_ascii_uppercase();
        if SEQUENCES.iter().any(|seq| seq.contains(&upper)) {
            return None;
        }
        let entropy = shannon_entropy(s);
        if s.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut e = entropy;
            if s.bytes().all(|b| b.is_ascii_digit()) && s.len() > 1 {
                e -= 1.2 / (s.len() as f64).log2();
            }
            return (e > self.config.hex_entropy_limit).then_some("hex_high_entropy");
        }
        (entropy > self.config.base64_entropy_limit).then_some("base64_high_entropy")
    }
}

fn shannon_entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

fn is_jwt(token: &str) -> bool {
    let header = token.split('.').next().unwrap_or("");
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .is_some_and(|v| v.is_object())
}

impl Step for Secrets {
    fn name(&self) -> &'static str {
        "secrets"
    }

    fn apply(&self, doc: &mut Document, counters: &mut Counters) -> Verdict {
        let found = self.find(&doc.text);
        if found.is_empty() {
            return Verdict::Keep;
        }
        for (_, _, kind) in &found {
            counters.bump(*kind, 1);
        }
        match self.config.action {
            SecretAction::Drop => Verdict::Drop("secret"),
            SecretAction::Redact => {
                let spans = found.into_iter().map(|(s, e, _)| (s, e, "<KEY>")).collect();
                doc.text = replace_spans(&doc.text, spans);
                Verdict::Keep
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<&'static str> {
        Secrets::new(SecretsConfig::default())
            .find(text)
            .into_iter()
            .map(|f| f.2)
            .collect()
    }

    #[test]
    fn provider_tokens() {
        assert_eq!(kinds("id = AKIAIOSFODNN7EXAMPLE;"), ["aws_access_key"]);
        assert_eq!(
            kinds("const char* t = \"ghp_0123456789abcdefghijABCDEFGHIJ012345\";"),
            ["github_token", "base64_high_entropy"]
        );
        assert_eq!(kinds("sk_live_4eC39HqLyjWDarjtT1zdp7dc"), ["stripe_key"]);
        assert_eq!(
            kinds("url = \"https://user:hunter2@example.com/x\";"),
            ["basic_auth"]
        );
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0In0.abc";
        assert_eq!(kinds(jwt), ["jwt"]);
        assert!(kinds("eyJnotjson.eyJx.y").is_empty());
    }

    #[test]
    fn private_key_blocks() {
        let pem =
            "k = \"-----BEGIN RSA PRIVATE KEY-----\\nMIIEow\\n-----END RSA PRIVATE KEY-----\";";
        assert_eq!(kinds(pem), ["private_key"]);
    }

    #[test]
    fn entropy_and_its_false_positive_filters() {
        assert_eq!(
            kinds("key = \"Zx9Qm2Lr7Tb4Wk1Np8Vd3Hs6Jf0Gc5YeUaRoPiK\";"),
            ["base64_high_entropy"]
        );
        assert_eq!(
            kinds("h = \"9f86d081884c7d659a2feaa0c55ad015\";"),
            ["hex_high_entropy"]
        );
        assert!(kinds("s = \"0123456789abcdef\";").is_empty(), "sequential");
        assert!(
            kinds("u = \"123e4567-e89b-12d3-a456-426614174000\";").is_empty(),
            "uuid"
        );
        assert!(
            kinds("n = \"someVeryLongIdentifierName_withWords\";").is_empty(),
            "identifier"
        );
        assert!(kinds("n = \"1234567890\";").is_empty(), "digits");
    }

    #[test]
    fn redact_or_drop() {
        let text = "auto k = \"AKIAIOSFODNN7EXAMPLE\";\n";
        let mut d = super::super::doc(text);
        let step = Secrets::new(SecretsConfig::default());
        assert_eq!(step.apply(&mut d, &mut Counters::default()), Verdict::Keep);
        assert_eq!(d.text, "auto k = \"<KEY>\";\n");
        let step = Secrets::new(SecretsConfig {
            action: SecretAction::Drop,
            ..Default::default()
        });
        let mut d = super::super::doc(text);
        assert_eq!(
            step.apply(&mut d, &mut Counters::default()),
            Verdict::Drop("secret")
        );
    }
}
