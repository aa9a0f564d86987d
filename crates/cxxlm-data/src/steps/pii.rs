use regex::Regex;
use std::net::IpAddr;

use super::{Counters, Step, Verdict};
use crate::config::PiiConfig;
use crate::document::Document;

const EMAIL: &str = r#"[^\s@?!;,:)('"<]+@[^\s@!?;,/]*[^\s@?!;,/:)('">.]\.\p{L}\w+"#;
const IPV4: &str =
    r"(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)";
const IPV6: &str = r"(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}|(?:[0-9a-fA-F]{1,4}:){1,7}:|(?:[0-9a-fA-F]{1,4}:){1,6}:[0-9a-fA-F]{1,4}|(?:[0-9a-fA-F]{1,4}:){1,5}(?::[0-9a-fA-F]{1,4}){1,2}|(?:[0-9a-fA-F]{1,4}:){1,4}(?::[0-9a-fA-F]{1,4}){1,3}|(?:[0-9a-fA-F]{1,4}:){1,3}(?::[0-9a-fA-F]{1,4}){1,4}|(?:[0-9a-fA-F]{1,4}:){1,2}(?::[0-9a-fA-F]{1,4}){1,5}|[0-9a-fA-F]{1,4}:(?::[0-9a-fA-F]{1,4}){1,6}|:(?:(?::[0-9a-fA-F]{1,4}){1,7}|:)|fe80:(?::[0-9a-fA-F]{0,4}){0,4}%[0-9a-zA-Z]+|::(?:ffff(?::0{1,4})?:)?(?:(?:25[0-5]|(?:2[0-4]|1?[0-9])?[0-9])\.){3}(?:25[0-5]|(?:2[0-4]|1?[0-9])?[0-9])|(?:[0-9a-fA-F]{1,4}:){1,4}:(?:(?:25[0-5]|(?:2[0-4]|1?[0-9])?[0-9])\.){3}(?:25[0-5]|(?:2[0-4]|1?[0-9])?[0-9])";

/// Public DNS resolvers that pii-lib leaves in place.
const POPULAR_DNS_SERVERS: [&str; 14] = [
    "8.8.8.8",
    "8.8.4.4",
    "1.1.1.1",
    "1.0.0.1",
    "76.76.19.19",
    "76.223.122.150",
    "9.9.9.9",
    "149.112.112.112",
    "208.67.222.222",
    "208.67.220.220",
    "8.26.56.26",
    "8.20.247.20",
    "94.140.14.14",
    "94.140.15.15",
];

/// pii-lib's regex pipeline: emails and IP addresses become `<EMAIL>` and
/// `<IP_ADDRESS>`. The patterns are pii-lib's; its look-around boundaries are checked
/// by hand (the `regex` crate has no look-around), and so are its post-filters: the
/// address must parse, must not look like a version (`1.2.3.4` without "dns" or
/// "server" nearby), and private ranges and popular DNS servers stay. One addition for
/// C++: an IPv6 candidate needs a digit and three colons, so `a::b` scope operators
/// are never taken for addresses, and an IPv4 candidate must be in a string literal or
/// near a word about addresses (see [`in_address_context`]). Keys are the secrets
/// step's job.
pub struct Pii {
    config: PiiConfig,
    email: Regex,
    ip: Regex,
}

impl Pii {
    pub fn new(config: PiiConfig) -> Self {
        Pii {
            config,
            email: Regex::new(EMAIL).expect("static pattern"),
            ip: Regex::new(&format!("{IPV4}|{IPV6}")).expect("static pattern"),
        }
    }

    fn emails(&self, text: &str, spans: &mut Vec<(usize, usize, &'static str)>) {
        if memchr::memchr(b'@', text.as_bytes()).is_none() {
            return;
        }
        for m in self.email.find_iter(text) {
            if bounded(text, m.start(), m.end(), EMAIL_LEFT, EMAIL_RIGHT) {
                spans.push((m.start(), m.end(), "<EMAIL>"));
            }
        }
    }

    fn ips(&self, text: &str, spans: &mut Vec<(usize, usize, &'static str)>) {
        for m in self.ip.find_iter(text) {
            // pii-lib's regex backtracks into a longer alternative when the boundary
            // after a short one fails ("2a00:1450::" of "2a00:1450::200e"): prefer the
            // whole run of address characters when it parses.
            let run = text[m.start()..]
                .find(|c: char| !(c.is_ascii_hexdigit() || c == ':' || c == '.'))
                .map_or(text.len(), |n| m.start() + n);
            let end = if run > m.end() && text[m.start()..run].parse::<IpAddr>().is_ok() {
                run
            } else {
                m.end()
            };
            let value = &text[m.start()..end];
            if !bounded(text, m.start(), end, IP_LEFT, IP_RIGHT) {
                continue;
            }
            let Ok(addr) = value.parse::<IpAddr>() else {
                continue;
            };
            if addr.is_ipv6()
                && (!value.bytes().any(|b| b.is_ascii_digit()) || value.matches(':').count() < 3)
            {
                continue;
            }
            if looks_like_version(text, m.start(), end) {
                continue;
            }
            if addr.is_ipv4() && !in_address_context(text, m.start(), end) {
                continue;
            }
            if is_private(addr) || POPULAR_DNS_SERVERS.contains(&value) {
                continue;
            }
            spans.push((m.start(), end, "<IP_ADDRESS>"));
        }
    }
}

const EMAIL_LEFT: &str = "@,?!;:)('\".<";
const EMAIL_RIGHT: &str = "@,?!;:)('\".>";
const IP_LEFT: &str = "@?,!;:'\")(.";
const IP_RIGHT: &str = "@,?!;:'\"(.";

fn is_han(c: char) -> bool {
    matches!(c as u32, 0x2E80..=0x2FDF | 0x3005..=0x3007 | 0x3021..=0x3029 | 0x3038..=0x303B | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x3FFFF)
}

fn bounded(text: &str, start: usize, end: usize, left: &str, right: &str) -> bool {
    let ok = |c: char, set: &str| c.is_whitespace() || set.contains(c) || is_han(c);
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    before.is_none_or(|c| ok(c, left)) && after.is_none_or(|c| ok(c, right))
}

/// pii-lib's `filter_versions`: `x.x.x.x` is a version unless "dns" or "server" is
/// within 100 characters.
fn looks_like_version(text: &str, start: usize, end: usize) -> bool {
    let value = &text[start..end];
    if !(value.len() == 7 && value.matches('.').count() == 3) {
        return false;
    }
    let (lo, hi) = context_bounds(text, start, end, 100);
    let context = text[lo..hi].to_lowercase();
    !(context.contains("dns") || context.contains("server"))
}

const ADDRESS_WORDS: [&str; 19] = [
    "ip ", "ip:", "ip=", "ip_", "_ip", "ipv4", "address", "addr", "host", "server", "dns", "inet",
    "socket", "connect", "http", "url", "gateway", "proxy", "subnet",
];

/// C++ text is full of dotted numbers that are not addresses: standard section
/// references ("per 20.9.3.2 para 8"), versions, OIDs. A dotted quad counts as an
/// address only inside a string literal or near a word about addresses.
fn in_address_context(text: &str, start: usize, end: usize) -> bool {
    if text[..start].ends_with(['"', '\'']) {
        return true;
    }
    let (lo, hi) = context_bounds(text, start, end, 100);
    let context = text[lo..hi].to_ascii_lowercase();
    ADDRESS_WORDS.iter().any(|w| context.contains(w))
}

fn context_bounds(text: &str, start: usize, end: usize, width: usize) -> (usize, usize) {
    let mut lo = start.saturating_sub(width);
    while !text.is_char_boundary(lo) {
        lo -= 1;
    }
    let mut hi = (end + width).min(text.len());
    while !text.is_char_boundary(hi) {
        hi += 1;
    }
    (lo, hi)
}

/// Python's `ipaddress` notion of private (not globally reachable) addresses.
fn is_private(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_documentation()
                || a.is_broadcast()
                || o[0] == 0
                || o[0] >= 240
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || a.to_ipv4_mapped()
                    .is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

/// Replace non-overlapping spans (earliest first) with their placeholders.
pub(crate) fn replace_spans(text: &str, mut spans: Vec<(usize, usize, &'static str)>) -> String {
    spans.sort_by_key(|s| (s.0, std::cmp::Reverse(s.1)));
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end, placeholder) in spans {
        if start < at {
            continue;
        }
        out.push_str(&text[at..start]);
        out.push_str(placeholder);
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

impl Step for Pii {
    fn name(&self) -> &'static str {
        "pii"
    }

    fn apply(&self, doc: &mut Document, counters: &mut Counters) -> Verdict {
        let mut spans = Vec::new();
        if self.config.emails {
            self.emails(&doc.text, &mut spans);
        }
        if self.config.ip_addresses {
            self.ips(&doc.text, &mut spans);
        }
        if !spans.is_empty() {
            for (_, _, placeholder) in &spans {
                counters.bump(placeholder.trim_matches(['<', '>']).to_lowercase(), 1);
            }
            doc.text = replace_spans(&doc.text, spans);
        }
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redact(text: &str) -> String {
        let mut d = super::super::doc(text);
        Pii::new(PiiConfig::default()).apply(&mut d, &mut Counters::default());
        d.text
    }

    #[test]
    fn emails_become_placeholders() {
        assert_eq!(
            redact("// Author: Jane Doe <jane.doe@example.org>\n// mail bob@corp.io, thanks"),
            "// Author: Jane Doe <<EMAIL>>\n// mail <EMAIL>, thanks"
        );
        assert_eq!(redact("x = a@b;"), "x = a@b;");
    }

    #[test]
    fn public_ips_are_replaced_private_and_versions_kept() {
        assert_eq!(
            redact("connect(\"93.184.216.34\");"),
            "connect(\"<IP_ADDRESS>\");"
        );
        assert_eq!(redact("host 192.168.1.10 here"), "host 192.168.1.10 here");
        assert_eq!(redact("dns 8.8.8.8 here"), "dns 8.8.8.8 here");
        assert_eq!(redact("version 1.2.3.4 here"), "version 1.2.3.4 here");
        assert_eq!(
            redact("server at 5.6.7.8 here"),
            "server at <IP_ADDRESS> here"
        );
        assert_eq!(
            redact("bad 300.1.1.1 and 33.01.33.33"),
            "bad 300.1.1.1 and 33.01.33.33"
        );
        assert_eq!(
            redact("v6 2a00:1450:4001:81b::200e here"),
            "v6 <IP_ADDRESS> here"
        );
    }

    #[test]
    fn standard_section_numbers_are_not_addresses() {
        let text = "// again automatically per 20.9.3.2 para 8\n// RFC-2068, section 19.6.1.1\n";
        assert_eq!(redact(text), text);
        assert_eq!(
            redact("const char* h = \"93.184.216.34\";"),
            "const char* h = \"<IP_ADDRESS>\";"
        );
    }

    #[test]
    fn cxx_scope_operators_are_not_ipv6() {
        let code = "dead::beef(x); ab::cd::ef; add::\n";
        assert_eq!(redact(code), code);
    }
}
