//! `cxxlm eval mbpp` on MultiPL-E's MBPP-C++: hand-written correct solutions pass, wrong,
//! crashing and non-compiling ones fail, and pass@k counts them.

mod common;

use common::*;
use serde_json::{json, Value};

const MBPP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../evals/multipl-e_mbpp-cpp-keep.jsonl"
);

/// (problem, a correct body, a wrong body)
const SOLUTIONS: [(&str, &str, &str); 12] = [
    ("mbpp_101_kth_element", "    return arr[k - 1];\n}\n", "    return arr[k];\n}\n"),
    ("mbpp_105_count", "    long c = 0;\n    for (bool b : lst) c += b;\n    return c;\n}\n", "    return lst.size();\n}\n"),
    ("mbpp_127_multiply_int", "    return x * y;\n}\n", "    return x + y;\n}\n"),
    ("mbpp_133_sum_negativenum", "    long s = 0;\n    for (long x : nums) if (x < 0) s += x;\n    return s;\n}\n", "    long s = 0;\n    for (long x : nums) if (x > 0) s += x;\n    return s;\n}\n"),
    ("mbpp_135_hexagonal_num", "    return n * (2 * n - 1);\n}\n", "    return n * (2 * n + 1);\n}\n"),
    ("mbpp_14_find_Volume", "    return (l * b * h) / 2;\n}\n", "    return l * b * h;\n}\n"),
    ("mbpp_145_max_Abs_Diff", "    return *std::max_element(arr.begin(), arr.end()) - *std::min_element(arr.begin(), arr.end());\n}\n", "    return arr.back() - arr.front();\n}\n"),
    ("mbpp_141_pancake_sort", "    std::sort(nums.begin(), nums.end());\n    return nums;\n}\n", "    std::sort(nums.rbegin(), nums.rend());\n    return nums;\n}\n"),
    ("mbpp_161_remove_elements", "    std::vector<long> out;\n    for (long x : list1)\n        if (std::find(list2.begin(), list2.end(), x) == list2.end()) out.push_back(x);\n    return out;\n}\n", "    return list1;\n}\n"),
    ("mbpp_162_sum_series", "    long s = 0;\n    for (long i = n; i > 0; i -= 2) s += i;\n    return s;\n}\n", "    long s = 0;\n    for (long i = n; i >= 0; i -= 1) s += i;\n    return s;\n}\n"),
    ("mbpp_132_tup_string", "    std::string s;\n    for (auto& t : tup1) s += t;\n    return s;\n}\n", "    return tup1[0];\n}\n"),
    ("mbpp_108_merge_sorted_list", "    std::vector<long> all(num1);\n    all.insert(all.end(), num2.begin(), num2.end());\n    all.insert(all.end(), num3.begin(), num3.end());\n    std::sort(all.begin(), all.end());\n    return all;\n}\n", "    return num1;\n}\n"),
];

/// `eval mbpp` of completion records (JSON lines) with `extra` flags: what it printed and
/// its JSON report.
fn judge_mbpp(lines: &[String], extra: &[&str]) -> (String, Value) {
    let tmp = tempfile::tempdir().unwrap();
    let completions = tmp.path().join("completions.jsonl");
    write(&completions, lines.join("\n"));
    let report = tmp.path().join("report.json");
    let cache = tmp.path().join("cache");
    let mut args = vec![
        "eval",
        "mbpp",
        "--problems",
        MBPP,
        "--completions",
        completions.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
    ];
    args.extend(extra);
    let out = run_ok(&args);
    let r = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), r)
}

#[test]
fn correct_solutions_pass_and_wrong_ones_fail() {
    let mut lines = Vec::new();
    for (name, good, bad) in SOLUTIONS {
        lines.push(json!({"name": name, "completion": good}).to_string());
        lines.push(json!({"name": name, "completion": bad}).to_string());
    }
    // A body that does not compile, and one that dereferences a null pointer.
    lines.push(
        json!({"name": "mbpp_127_multiply_int", "completion": "    return x * ;\n}\n"}).to_string(),
    );
    lines.push(json!({"name": "mbpp_127_multiply_int", "completion": "    int* p = nullptr;\n    return *p + x * y;\n}\n"}).to_string());
    // Falls off the end without a value: undefined behaviour that "passes" when built
    // without -Werror=return-type, at any optimization level.
    lines.push(json!({"name": "mbpp_127_multiply_int", "completion": "    long r = x * y;\n    if (r < 0) return -r;\n}\n"}).to_string());
    let (said, r) = judge_mbpp(&lines, &["--k", "1,2"]);
    assert!(
        said.contains("12 problems, 27 samples: 25 compiled, 12 passed"),
        "{said}"
    );
    let verdicts = r["verdicts"].as_array().unwrap();
    for (i, (name, _, _)) in SOLUTIONS.iter().enumerate() {
        assert_eq!(verdicts[2 * i]["name"], *name);
        assert_eq!(
            verdicts[2 * i]["passed"],
            true,
            "{name}: {}",
            verdicts[2 * i]
        );
        assert_eq!(verdicts[2 * i + 1]["passed"], false, "{name}");
    }
    assert_eq!(verdicts[24]["category"], "syntax");
    assert_eq!(verdicts[25]["ending"], "undefined_behaviour");
    assert_eq!(verdicts[26]["category"], "return", "{}", verdicts[26]);
    assert!(
        said.contains("control reaches end of non-void function"),
        "{said}"
    );
    // Each problem has one good sample among two (five for multiply_int): pass@2 is 1
    // for those two-sample problems, pass@1 the share of good samples.
    let p1 = r["pass_at_k"]["pass@1"].as_f64().unwrap();
    assert!((p1 - (11.0 * 0.5 + 0.2) / 12.0).abs() < 1e-9, "{p1}");
    let p2 = r["pass_at_k"]["pass@2"].as_f64().unwrap();
    assert!((p2 - (11.0 + 0.4) / 12.0).abs() < 1e-9, "{p2}");
}

#[test]
fn problems_that_no_body_can_compile_are_named_and_set_apart() {
    // MultiPL-E translated mbpp_230's parameter as `std::string char`.
    let lines = [
        json!({"name": "mbpp_230_replace_blank", "completion": "    return str1;\n}\n"}),
        json!({"name": "mbpp_127_multiply_int", "completion": "    return x * y;\n}\n"}),
        json!({"name": "mbpp_127_multiply_int", "completion": "    return x * ;\n}\n"}),
    ];
    let (said, r) = judge_mbpp(&lines.map(|l| l.to_string()), &[]);
    // Two problems: 0 of 1 and 1 of 2 compiled, a rate of 1/3 whose error is over the two
    // problems, not the three samples.
    assert!(said.contains("compile rate: 0.3333 ± 0.2222"), "{said}");
    let error = r["compile_rate_standard_error"].as_f64().unwrap();
    assert!((error - 2.0 / 9.0).abs() < 1e-9, "{error}");
    assert!(
        said.contains("1 of 2 problems cannot compile with any body (their prompt or tests are broken: mbpp_230_replace_blank); over the others' 2 samples the compile rate is 0.5000"),
        "{said}"
    );
    assert_eq!(r["unbuildable"], json!(["mbpp_230_replace_blank"]));
    assert_eq!(
        (
            r["buildable_samples"].as_u64(),
            r["buildable_compiled"].as_u64()
        ),
        (Some(2), Some(1))
    );
}

#[test]
fn humaneval_reference_solutions_that_do_not_build_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let problems = tmp.path().join("humaneval.jsonl");
    let record = |id: &str, solution: &str| {
        json!({"task_id": id, "prompt": "#include <vector>\nint add(int a, int b) {\n",
            "declaration": "int add(int a, int b) {\n", "canonical_solution": solution,
            "test": "int main() { return add(1, 2) == 3 ? 0 : 1; }\n"})
        .to_string()
    };
    write(
        &problems,
        [
            record("CPP/0", "    return a + b;\n}\n"),
            record(
                "CPP/1",
                "    #include <cxxlm_absent/any.hpp>\n    return a + b;\n}\n",
            ),
        ]
        .join("\n"),
    );
    let report = tmp.path().join("report.json");
    let out = run_ok(&[
        "eval",
        "humaneval",
        "--problems",
        problems.to_str().unwrap(),
        "--canonical",
        "--cache",
        tmp.path().join("cache").to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("2 problems, 2 samples: 1 compiled, 1 passed"),
        "{said}"
    );
    assert!(said.contains("compile: missing_header"), "{said}");
    assert!(
        said.contains("CPP/1:") && said.contains("cxxlm_absent/any.hpp: No such file or directory"),
        "{said}"
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let failed = &r["verdicts"][1];
    assert_eq!(failed["category"], "missing_header", "{failed}");
    let message = failed["compiler_message"].as_str().unwrap();
    assert!(
        message.contains("fatal error: cxxlm_absent/any.hpp"),
        "{message}"
    );
    assert!(r["verdicts"][0]["compiler_message"].is_null());
}

/// A small C++ program that compiles on its own, varied by `k`.
fn program(k: usize) -> String {
    format!(
        r#"#include <string>
#include <vector>

// Sum of the first n squares, plus {k}.
long squares_{k}(int n) {{
    long total = {k};
    for (int i = 1; i <= n; ++i) {{
        total += static_cast<long>(i) * i;
    }}
    return total;
}}

std::string repeat_{k}(const std::string& s, int times) {{
    std::string out;
    while (times-- > 0) {{
        out += s;
    }}
    return out;
}}

int main() {{
    std::vector<long> v;
    for (int i = 0; i < {k} + 3; ++i) {{
        v.push_back(squares_{k}(i));
    }}
    return repeat_{k}("x", 2).size() == 2 ? 0 : 1;
}}
"#
    )
}

#[test]
fn fim_hides_spans_and_recompiles_self_contained_files_and_retrieval_asks_at_each_distance() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let src = root.join("src");
    for k in 0..40 {
        write(&src.join(format!("p{k:02}.cpp")), program(k));
    }
    let p = |name: &str| root.join(name).to_str().unwrap().to_string();
    data_run(&src, &root.join("data"), &[]);
    run_ok(&[
        "tok",
        "train",
        "-i",
        &p("data"),
        "--vocab",
        "512",
        "-o",
        &p("tok.json"),
    ]);
    run_ok(&[
        "pack",
        "--tokenizer",
        &p("tok.json"),
        "-i",
        &p("data"),
        "-o",
        &p("pack"),
        "--val-fraction",
        "0.3",
    ]);
    run_ok(&[
        "train",
        "pretrain",
        "--pack",
        &p("pack"),
        "--out",
        &p("run"),
        "--set",
        "model.preset=tiny",
        "--set",
        "model.seq_len=128",
        "--set",
        "train.device=cpu",
        "--set",
        "train.device_batch=4",
        "--set",
        "train.total_batch_tokens=512",
        "--set",
        "train.steps=20",
        "--set",
        "eval.every=0",
    ]);
    let said = run_ok(&[
        "eval",
        "fim",
        "--checkpoint",
        &p("run"),
        "--pack",
        &p("pack"),
        "--documents",
        "6",
        "--max-tokens",
        "48",
        "--cache",
        &p("cache"),
        "--json",
        &p("fim.json"),
    ]);
    let stdout = String::from_utf8_lossy(&said.stdout);
    // Up to 6: as many as the validation split holds with a span to hide.
    let documents: usize = stdout
        .split("FIM on ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!((1..=6).contains(&documents), "{stdout}");

    // Retrieval: prompts that fit the 128-token context, at each distance and without the
    // definition.
    run_ok(&[
        "eval",
        "retrieval",
        "--checkpoint",
        &p("run"),
        "--pack",
        &p("pack"),
        "--distances",
        "8,24",
        "--tokens",
        "4",
        "--json",
        &p("retrieval.json"),
    ]);
    let retrieval: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("retrieval.json")).unwrap())
            .unwrap();
    let rows = retrieval["rows"].as_array().unwrap();
    let distances: Vec<&Value> = rows.iter().map(|r| &r["distance"]).collect();
    assert_eq!(distances, [&Value::from(8), &Value::from(24), &Value::Null]);
    for r in rows {
        let (asked, copied) = (r["asked"].as_u64().unwrap(), r["copied"].as_u64().unwrap());
        assert!(asked >= 1 && copied <= asked, "{retrieval}");
        assert_eq!(
            asked + r["left_out"].as_u64().unwrap(),
            retrieval["functions"]
        );
    }

    // Completions written without judging them (for machines without bubblewrap).
    let generated = run_ok(&[
        "eval",
        "mbpp",
        "--checkpoint",
        &p("run"),
        "--limit",
        "2",
        "--max-tokens",
        "8",
        "--completions-out",
        &p("completions.jsonl"),
        "--generate-only",
    ]);
    let judged = String::from_utf8_lossy(&generated.stdout);
    assert!(!judged.contains("compile rate"), "{judged}");
    let written = std::fs::read_to_string(root.join("completions.jsonl")).unwrap();
    let names: Vec<String> = written
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(names.len(), 2, "{written}");
    assert!(names.iter().all(|n| n.starts_with("mbpp_")), "{names:?}");
    let fim: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("fim.json")).unwrap()).unwrap();
    for span in ["line", "block", "function"] {
        let s = &fim["spans"][span];
        // Every program of the fixture has a line, a block and a body to hide; the
        // validation split (by a hash of the documents' paths, under a fresh temporary
        // folder) holds up to 6 of them.
        assert_eq!(s["tried"], documents, "{span}: {s}");
        let (compiled, contained) = (
            s["compiled"].as_u64().unwrap(),
            s["self_contained"].as_u64().unwrap(),
        );
        assert!(compiled <= contained);
        if span == "line" {
            assert_eq!(contained, 0);
        } else {
            // Every file compiles on its own, and every body and block is code g++ sees.
            assert_eq!(contained as usize, documents, "{span}: {s}");
        }
    }
    let examples = fim["examples"].as_array().unwrap();
    assert!(examples
        .iter()
        .any(|e| e["span"] == "function" && e["expected"].as_str().unwrap().contains("return")));
}

/// Two models' reports against a baseline's: the difference is paired over the problems
/// they share; a report without verdicts is named.
#[test]
fn models_are_compared_problem_by_problem() {
    let dir = tempfile::tempdir().unwrap();
    let report = |file: &str, verdicts: &[(&str, bool, bool)]| {
        let path = dir.path().join(file);
        let verdicts: Vec<Value> = verdicts
            .iter()
            .map(|&(name, compiled, passed)| json!({"name": name, "compiled": compiled, "passed": passed}))
            .collect();
        write(&path, json!({ "verdicts": verdicts }).to_string());
        path.to_str().unwrap().to_string()
    };
    // Two samples of each problem. The baseline compiles one of `a`'s and none of `b`'s.
    let base = report(
        "base.json",
        &[
            ("a", true, false),
            ("a", false, false),
            ("b", false, false),
            ("b", false, false),
        ],
    );
    // The other compiles both of `a`'s (one passes) and one of `b`'s: +0.5 on each.
    let other = report(
        "other.json",
        &[
            ("a", true, true),
            ("a", true, false),
            ("b", true, false),
            ("b", false, false),
            ("c", true, true),
            ("c", true, true),
        ],
    );
    let out = run_ok(&["eval", "compare", &base, &other]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("(baseline): 2 problems; compiled 25.0% ± 25.0, passed 0.0% ± 0.0"),
        "{said}"
    );
    assert!(
        said.contains("against the baseline on the 2 both have: compiled +50.0 ± 0.0 points, passed +25.0 ± 25.0"),
        "{said}"
    );
    let empty = report("empty.json", &[]);
    let e = run_fails(&["eval", "compare", &base, &empty]);
    assert!(e.contains("empty.json: no verdicts"), "{e}");
}
