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

#[test]
fn correct_solutions_pass_and_wrong_ones_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let completions = tmp.path().join("completions.jsonl");
    let mut lines = Vec::new();
    for (name, good, bad) in SOLUTIONS {
        lines.push(json!({"name": name, "completion": good}).to_string());
        lines.push(json!({"name": name, "completion": bad}).to_string());
    }
    // A body that does not compile, and one that crashes.
    lines.push(
        json!({"name": "mbpp_127_multiply_int", "completion": "    return x * ;\n}\n"}).to_string(),
    );
    lines.push(json!({"name": "mbpp_127_multiply_int", "completion": "    int* p = nullptr;\n    return *p + x * y;\n}\n"}).to_string());
    write(&completions, lines.join("\n"));
    let report = tmp.path().join("report.json");
    let out = run_ok(&[
        "eval",
        "mbpp",
        "--problems",
        MBPP,
        "--completions",
        completions.to_str().unwrap(),
        "--k",
        "1,2",
        "--json",
        report.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("12 problems, 26 samples: 25 compiled, 12 passed"),
        "{said}"
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
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
    assert_eq!(verdicts[25]["ending"], "signal");
    // Each problem has one good sample among two (four for multiply_int): pass@2 is 1
    // for those two-sample problems, pass@1 the share of good samples.
    let p1 = r["pass_at_k"]["pass@1"].as_f64().unwrap();
    assert!((p1 - (11.0 * 0.5 + 0.25) / 12.0).abs() < 1e-9, "{p1}");
    assert_eq!(
        r["pass_at_k"]["pass@2"].as_f64().unwrap(),
        (11.0 + 0.5) / 12.0
    );
}
