use aho_corasick::AhoCorasick;
use regex::Regex;
use serde_json::Value;

use super::{Counters, Step, Verdict};
use crate::config::LicenseConfig;
use crate::document::Document;

/// License texts recognised by a distinctive phrase (normalized: lower case, words
/// separated by single spaces). Versions are read from the words after the phrase.
const PHRASES: &[(&str, Family)] = &[
    ("permission is hereby granted free of charge to any person obtaining a copy", Family::Fixed("MIT")),
    ("licensed under the mit license", Family::Fixed("MIT")),
    ("apache license version 2 0", Family::Fixed("Apache-2.0")),
    ("redistribution and use in source and binary forms", Family::Bsd),
    ("gnu lesser general public license", Family::Lgpl),
    ("gnu library general public license", Family::Lgpl),
    ("gnu general public license", Family::Gpl),
    ("gnu affero general public license", Family::Fixed("AGPL-3.0")),
    ("gcc runtime library exception", Family::Fixed("GCC-exception-3.1")),
    ("mozilla public license v 2 0", Family::Fixed("MPL-2.0")),
    ("mozilla public license version 2 0", Family::Fixed("MPL-2.0")),
    ("boost software license version 1 0", Family::Fixed("BSL-1.0")),
    ("this software is provided as is without any express or implied warranty in no event will the authors be held liable", Family::Fixed("Zlib")),
    ("permission to use copy modify and or distribute this software for any purpose with or without fee", Family::Fixed("ISC")),
    ("permission to use copy modify and distribute this software for any purpose with or without fee", Family::Fixed("ISC")),
    ("this is free and unencumbered software released into the public domain", Family::Fixed("Unlicense")),
    ("eclipse public license", Family::Fixed("EPL-2.0")),
];

const PERMISSIVE: &[&str] = &[
    "MIT",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "0BSD",
    "Apache-2.0",
    "BSL-1.0",
    "Zlib",
    "ISC",
    "Unlicense",
    "CC0-1.0",
    "X11",
    "NCSA",
    "PSF-2.0",
    "Python-2.0",
    "curl",
    "libpng",
    "LLVM-exception",
    "Apache-2.0 WITH LLVM-exception",
];

#[derive(Clone, Copy)]
enum Family {
    Fixed(&'static str),
    Bsd,
    Gpl,
    Lgpl,
}

/// Finds the license of a file from its head: an `SPDX-License-Identifier` tag wins,
/// otherwise the license texts above. Work is bounded by `head_bytes`, whatever the
/// size of the file, and linear in it (one Aho-Corasick pass).
pub struct Licenses {
    head_bytes: usize,
    phrases: AhoCorasick,
    spdx: Regex,
}

impl Licenses {
    pub fn new(head_bytes: usize) -> Self {
        Licenses {
            head_bytes,
            phrases: AhoCorasick::builder()
                .kind(Some(aho_corasick::AhoCorasickKind::DFA))
                .prefilter(false)
                .build(PHRASES.iter().map(|(p, _)| p))
                .expect("static patterns"),
            spdx: Regex::new(r"SPDX-License-Identifier:\s*([A-Za-z0-9.+() -]+)").expect("static"),
        }
    }

    /// The license as an SPDX expression, if one was found.
    pub fn detect(&self, text: &str) -> Option<String> {
        let mut end = self.head_bytes.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let head = &text[..end];
        if let Some(c) = self.spdx.captures(head) {
            let expr = c[1].trim().trim_end_matches("*/").trim();
            if !expr.is_empty() {
                return Some(expr.to_string());
            }
        }
        let words = normalize_words(head);
        let mut found: Vec<String> = Vec::new();
        // A GNU license named without a version ("a copy of the GNU General Public
        // License") counts only if no versioned mention of the same license exists.
        let mut unversioned: Vec<String> = Vec::new();
        for m in self.phrases.find_iter(&words) {
            let after = &words[m.end()..words.len().min(m.end() + 400)];
            let id = match PHRASES[m.pattern().as_usize()].1 {
                Family::Fixed(id) => id.to_string(),
                Family::Bsd => {
                    if after.contains("advertising materials") {
                        "BSD-4-Clause".into()
                    } else if after.contains("neither the name")
                        || after.contains("endorse or promote")
                    {
                        "BSD-3-Clause".into()
                    } else {
                        "BSD-2-Clause".into()
                    }
                }
                Family::Gpl | Family::Lgpl => {
                    let (name, versions): (&str, &[&str]) = match PHRASES[m.pattern().as_usize()].1
                    {
                        Family::Gpl => ("GPL", &["3", "2"]),
                        _ => ("LGPL", &["3", "2 1", "2"]),
                    };
                    match gnu_version(name, after, versions) {
                        Some(id) => id,
                        None => {
                            unversioned.push(format!("{name}-2.0-or-later"));
                            continue;
                        }
                    }
                }
            };
            if !found.contains(&id) {
                found.push(id);
            }
        }
        for id in unversioned {
            let family = id.split('-').next().unwrap_or("");
            if !found.iter().any(|f| f.split('-').next() == Some(family)) && !found.contains(&id) {
                found.push(id);
            }
        }
        if let Some(i) = found.iter().position(|l| l == "GCC-exception-3.1") {
            found.remove(i);
            found.retain(|l| !l.starts_with("GPL-3.0"));
            found.insert(0, "GPL-3.0-or-later WITH GCC-exception-3.1".into());
        }
        (!found.is_empty()).then(|| found.join(" AND "))
    }
}

fn gnu_version(name: &str, after: &str, versions: &[&str]) -> Option<String> {
    // Only the sentence that names the license: up to the next mention of another one.
    let after = after
        .split("license")
        .take(2)
        .collect::<Vec<_>>()
        .join("license");
    for v in versions {
        if after.contains(&format!("version {v} ")) {
            let spdx_v = match *v {
                "3" => "3.0",
                "2 1" => "2.1",
                _ => "2.0",
            };
            let later = after.contains("any later version");
            return Some(format!(
                "{name}-{spdx_v}{}",
                if later { "-or-later" } else { "-only" }
            ));
        }
    }
    None
}

/// Lower-cased ASCII words of the head, comment markers and punctuation gone (license
/// phrases are ASCII; other characters separate words).
fn normalize_words(head: &str) -> String {
    const FOLD: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut b = 0;
        while b < 128 {
            let c = b as u8;
            if c.is_ascii_alphanumeric() {
                t[b] = c.to_ascii_lowercase();
            }
            b += 1;
        }
        t
    };
    let bytes = head.as_bytes();
    let mut out = vec![0u8; bytes.len() + 1];
    let mut n = 0;
    let mut space = false;
    for &b in bytes {
        let c = FOLD[b as usize];
        if c != 0 {
            out[n] = c;
            n += 1;
            space = false;
        } else if !space {
            out[n] = b' ';
            n += 1;
            space = true;
        }
    }
    out[n] = b' ';
    out.truncate(n + 1);
    // Only ASCII bytes were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Whether an SPDX expression allows permissive use: some `OR` alternative whose every
/// `AND` term is permissive.
pub fn is_permissive(expr: &str) -> bool {
    expr.split(" OR ").any(|alt| {
        alt.trim_matches(['(', ')', ' '])
            .split(" AND ")
            .all(|term| {
                let term = term.trim_matches(['(', ')', ' ']);
                let base = term.split(" WITH ").next().unwrap_or(term);
                PERMISSIVE.contains(&term) || PERMISSIVE.contains(&base)
            })
    })
}

pub struct LicenseFilter {
    config: LicenseConfig,
    licenses: Licenses,
}

impl LicenseFilter {
    pub fn new(config: LicenseConfig) -> Self {
        LicenseFilter {
            licenses: Licenses::new(config.head_bytes),
            config,
        }
    }
}

impl Step for LicenseFilter {
    fn name(&self) -> &'static str {
        "license"
    }

    fn apply(&self, doc: &mut Document, counters: &mut Counters) -> Verdict {
        let Some(license) = self.licenses.detect(&doc.text) else {
            counters.bump("unknown", 1);
            if self.config.permissive_only && self.config.drop_unknown {
                return Verdict::Drop("unknown_license");
            }
            return Verdict::Keep;
        };
        counters.bump(license.clone(), 1);
        let permissive = is_permissive(&license);
        doc.meta.insert("license".into(), Value::String(license));
        if self.config.permissive_only && !permissive {
            return Verdict::Drop("not_permissive");
        }
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect(text: &str) -> Option<String> {
        Licenses::new(8192).detect(text)
    }

    #[test]
    fn spdx_tag_wins() {
        let t = "// SPDX-License-Identifier: Apache-2.0 WITH LLVM-exception\n// MIT text...\n";
        assert_eq!(detect(t).as_deref(), Some("Apache-2.0 WITH LLVM-exception"));
        assert_eq!(
            detect("/* SPDX-License-Identifier: MIT */\n").as_deref(),
            Some("MIT")
        );
    }

    #[test]
    fn license_texts_in_comments() {
        let mit = "/*\n * Permission is hereby granted, free of charge, to any person\n * obtaining a copy of this software */";
        assert_eq!(detect(mit).as_deref(), Some("MIT"));
        let libstdcxx = "// This library is free software; you can redistribute it and/or modify it under the\n// terms of the GNU General Public License as published by the\n// Free Software Foundation; either version 3, or (at your option)\n// any later version.\n// Under Section 7 of GPL version 3, you are granted additional\n// permissions described in the GCC Runtime Library Exception, version\n// 3.1, as published by the Free Software Foundation.\n// You should have received a copy of the GNU General Public License and\n// a copy of the GCC Runtime Library Exception along with this program.";
        assert_eq!(
            detect(libstdcxx).as_deref(),
            Some("GPL-3.0-or-later WITH GCC-exception-3.1")
        );
        let glibc = "The GNU C Library is free software; you can redistribute it and/or\n   modify it under the terms of the GNU Lesser General Public\n   License as published by the Free Software Foundation; either\n   version 2.1 of the License, or (at your option) any later version.";
        assert_eq!(detect(glibc).as_deref(), Some("LGPL-2.1-or-later"));
        let bsd3 = "# Redistribution and use in source and binary forms, with or without\n# modification... Neither the name of the copyright holder";
        assert_eq!(detect(bsd3).as_deref(), Some("BSD-3-Clause"));
        let boost = "// Distributed under the Boost Software License, Version 1.0.";
        assert_eq!(detect(boost).as_deref(), Some("BSL-1.0"));
        assert_eq!(detect("int main() {}\n"), None);
    }

    #[test]
    fn only_the_head_is_searched() {
        let late = format!(
            "{}// Licensed under the Apache License, Version 2.0\n",
            "int a;\n".repeat(2000)
        );
        assert_eq!(detect(&late), None);
    }

    #[test]
    fn permissive_expressions() {
        assert!(is_permissive("MIT"));
        assert!(is_permissive("Apache-2.0 WITH LLVM-exception"));
        assert!(is_permissive("GPL-2.0-only OR MIT"));
        assert!(!is_permissive("GPL-3.0-or-later WITH GCC-exception-3.1"));
        assert!(!is_permissive("MIT AND GPL-2.0-only"));
    }

    #[test]
    fn permissive_only_filter() {
        let step = LicenseFilter::new(LicenseConfig {
            permissive_only: true,
            ..Default::default()
        });
        let mut gpl = super::super::doc("// SPDX-License-Identifier: GPL-2.0-only\nint x;\n");
        let mut c = Counters::default();
        assert_eq!(
            step.apply(&mut gpl, &mut c),
            Verdict::Drop("not_permissive")
        );
        assert_eq!(gpl.meta["license"], "GPL-2.0-only");
        let mut unknown = super::super::doc("int x;\n");
        assert_eq!(step.apply(&mut unknown, &mut c), Verdict::Keep);
        assert_eq!(c.get("unknown"), 1);
    }
}
