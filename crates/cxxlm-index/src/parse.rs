//! One file's symbols from tree-sitter-cpp: what it defines (functions, their
//! declarations, classes, enums and their values, typedefs, macros, namespace-scope
//! variables), the identifiers it uses, and its `#include`s.

use std::time::{Duration, Instant};

use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};
use tree_sitter::{Node, ParseOptions, Parser};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A function or method with its body.
    Function,
    /// A function or method declared without a body (a prototype, a member in a class).
    Declaration,
    Class,
    Struct,
    Union,
    Enum,
    Enumerator,
    Typedef,
    Macro,
    Variable,
    Concept,
    /// A data member.
    Field,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::Function,
        Kind::Declaration,
        Kind::Class,
        Kind::Struct,
        Kind::Union,
        Kind::Enum,
        Kind::Enumerator,
        Kind::Typedef,
        Kind::Macro,
        Kind::Variable,
        Kind::Concept,
        Kind::Field,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Function => "function",
            Kind::Declaration => "declaration",
            Kind::Class => "class",
            Kind::Struct => "struct",
            Kind::Union => "union",
            Kind::Enum => "enum",
            Kind::Enumerator => "enumerator",
            Kind::Typedef => "typedef",
            Kind::Macro => "macro",
            Kind::Variable => "variable",
            Kind::Concept => "concept",
            Kind::Field => "field",
        }
    }

    pub fn code(self) -> u8 {
        Kind::ALL.iter().position(|k| *k == self).unwrap_or(0) as u8
    }

    pub fn from_code(code: u8) -> Option<Kind> {
        Kind::ALL.get(code as usize).copied()
    }
}

/// A definition as parsed: lines are 1-based and inclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedDef {
    pub name: String,
    pub kind: Kind,
    pub line: u32,
    pub end_line: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Include {
    /// As written between the quotes or angle brackets.
    pub path: String,
    pub angle: bool,
    pub line: u32,
}

#[derive(Debug, Default)]
pub struct Parsed {
    pub defs: Vec<ParsedDef>,
    /// Every identifier used outside a definition's name, with the lines it is on.
    pub refs: Vec<(String, u32)>,
    pub includes: Vec<Include>,
    /// Names declared inside functions (parameters, locals): uses of these near a
    /// cursor mean the local, not a definition elsewhere. Not stored.
    pub locals: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The parser gave up after the time limit (a pathological file).
    Timeout,
}

/// A tree-sitter parser for C++ with a time limit per file.
pub struct CppParser {
    parser: Parser,
    limit: Duration,
}

impl CppParser {
    pub fn new(limit: Duration) -> CppParser {
        let mut parser = Parser::new();
        parser
            .set_language(&tree_sitter_cpp::LANGUAGE.into())
            .expect("the C++ grammar matches the tree-sitter library it was built for");
        CppParser { parser, limit }
    }

    pub fn parse(&mut self, text: &str) -> Result<Parsed, ParseError> {
        Ok(symbols(&self.tree(text)?.root_node(), text.as_bytes()))
    }

    /// The functions `text` calls: each callee's name as written last (`f` of
    /// `a.b.f(x)`, `ns::f(x)` or `f<T>(x)`) and the call's line.
    pub fn calls(&mut self, source: &str) -> Result<Vec<(String, u32)>, ParseError> {
        let tree = self.tree(source)?;
        let mut calls = Vec::new();
        visit(&tree.root_node(), |node| {
            if node.kind() == "call_expression" {
                if let Some(name) = node.child_by_field_name("function").and_then(callee) {
                    calls.push((text(&name, source.as_bytes()).to_string(), line(&node)));
                }
            }
        });
        Ok(calls)
    }

    fn tree(&mut self, text: &str) -> Result<tree_sitter::Tree, ParseError> {
        let started = Instant::now();
        let limit = self.limit;
        // Returning true cancels the parse.
        let mut over_time = |_: &tree_sitter::ParseState| started.elapsed() > limit;
        let bytes = text.as_bytes();
        let tree = self
            .parser
            .parse_with_options(
                &mut |at, _| bytes.get(at..).unwrap_or_default(),
                None,
                Some(ParseOptions::new().progress_callback(&mut over_time)),
            )
            .ok_or(ParseError::Timeout);
        // A parse stopped half-way leaves state behind for the next one otherwise.
        self.parser.reset();
        tree
    }
}

/// The name node of a called function, if the callee is named.
fn callee(mut node: Node) -> Option<Node> {
    for _ in 0..64 {
        match node.kind() {
            "identifier" | "field_identifier" | "destructor_name" | "operator_name" => {
                return Some(node)
            }
            "field_expression" => node = node.child_by_field_name("field")?,
            "qualified_identifier" | "template_function" | "template_method" => {
                node = node.child_by_field_name("name")?
            }
            _ => return None,
        }
    }
    None
}

/// Calls `f` on every node, depth first, without recursion: deep trees do not
/// overflow the stack.
fn visit<'t>(root: &Node<'t>, mut f: impl FnMut(Node<'t>)) {
    let mut cursor = root.walk();
    'walk: loop {
        f(cursor.node());
        if cursor.goto_first_child() {
            continue;
        }
        loop {
            if cursor.goto_next_sibling() {
                continue 'walk;
            }
            if !cursor.goto_parent() {
                break 'walk;
            }
        }
    }
}

fn text<'a>(node: &Node, src: &'a [u8]) -> &'a str {
    std::str::from_utf8(&src[node.byte_range()]).unwrap_or_default()
}

fn line(node: &Node) -> u32 {
    node.start_position().row as u32 + 1
}

fn end_line(node: &Node) -> u32 {
    let end = node.end_position();
    // A node that ends at the start of a line (a trailing newline) ends on the line before.
    let row = match end.column == 0 && end.row > node.start_position().row {
        true => end.row - 1,
        false => end.row,
    };
    row as u32 + 1
}

/// The name a declarator declares, and whether it declares a function.
fn declarator_name<'t>(mut node: Node<'t>) -> Option<(Node<'t>, bool)> {
    let mut function = false;
    for _ in 0..64 {
        match node.kind() {
            "identifier" | "field_identifier" | "type_identifier" | "destructor_name"
            | "operator_name" => return Some((node, function)),
            "qualified_identifier" | "template_function" | "template_type" | "template_method" => {
                node = node.child_by_field_name("name")?
            }
            "function_declarator" => {
                function = true;
                node = node.child_by_field_name("declarator")?
            }
            _ => {
                node = match node.child_by_field_name("declarator") {
                    Some(d) => d,
                    None => {
                        let mut cursor = node.walk();
                        let last = node.named_children(&mut cursor).last()?;
                        last
                    }
                }
            }
        }
    }
    None
}

/// The node a definition spans: a template's whole declaration with its parameters.
fn span(node: Node) -> Node {
    match node.parent() {
        Some(p) if p.kind() == "template_declaration" => p,
        _ => node,
    }
}

fn is_namespace_scope(node: &Node) -> bool {
    match node.parent() {
        None => true,
        Some(p) => {
            matches!(
                p.kind(),
                "translation_unit" | "declaration_list" | "linkage_specification"
            ) || (p.kind() == "template_declaration" && is_namespace_scope(&p))
        }
    }
}

fn symbols(root: &Node, src: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    let mut names = FxHashSet::default();
    let def = |out: &mut Parsed, names: &mut FxHashSet<usize>, name: Node, kind, whole: Node| {
        let spelled = text(&name, src);
        if spelled.is_empty() {
            return;
        }
        names.insert(name.start_byte());
        let whole = span(whole);
        out.defs.push(ParsedDef {
            name: spelled.to_string(),
            kind,
            line: line(&whole),
            end_line: end_line(&whole),
        });
    };
    visit(root, |node| match node.kind() {
        "function_definition" => {
            if let Some((name, _)) = node
                .child_by_field_name("declarator")
                .and_then(declarator_name)
            {
                def(&mut out, &mut names, name, Kind::Function, node);
            }
        }
        "declaration" | "field_declaration" => {
            let mut c = node.walk();
            for d in node.children_by_field_name("declarator", &mut c) {
                match declarator_name(d) {
                    Some((name, true)) => def(&mut out, &mut names, name, Kind::Declaration, node),
                    Some((name, false)) if node.kind() == "field_declaration" => {
                        def(&mut out, &mut names, name, Kind::Field, node)
                    }
                    Some((name, false)) if is_namespace_scope(&node) => {
                        def(&mut out, &mut names, name, Kind::Variable, node)
                    }
                    Some((name, false)) => out.locals.push(text(&name, src).to_string()),
                    None => {}
                }
            }
        }
        "parameter_declaration" | "optional_parameter_declaration" | "for_range_loop" => {
            if let Some((name, _)) = node
                .child_by_field_name("declarator")
                .and_then(declarator_name)
            {
                out.locals.push(text(&name, src).to_string());
            }
        }
        "class_specifier" | "struct_specifier" | "union_specifier" | "enum_specifier"
            if node.child_by_field_name("body").is_some() =>
        {
            if let Some((name, _)) = node.child_by_field_name("name").and_then(declarator_name) {
                let kind = match node.kind() {
                    "class_specifier" => Kind::Class,
                    "struct_specifier" => Kind::Struct,
                    "union_specifier" => Kind::Union,
                    _ => Kind::Enum,
                };
                def(&mut out, &mut names, name, kind, node);
            }
        }
        "enumerator" => {
            if let Some(name) = node.child_by_field_name("name") {
                def(&mut out, &mut names, name, Kind::Enumerator, node);
            }
        }
        "type_definition" => {
            let mut c = node.walk();
            for d in node.children_by_field_name("declarator", &mut c) {
                if let Some((name, _)) = declarator_name(d) {
                    def(&mut out, &mut names, name, Kind::Typedef, node);
                }
            }
        }
        "alias_declaration" => {
            if let Some(name) = node.child_by_field_name("name") {
                def(&mut out, &mut names, name, Kind::Typedef, node);
            }
        }
        "concept_definition" => {
            if let Some(name) = node.child_by_field_name("name") {
                def(&mut out, &mut names, name, Kind::Concept, node);
            }
        }
        "preproc_def" | "preproc_function_def" => {
            if let Some(name) = node.child_by_field_name("name") {
                def(&mut out, &mut names, name, Kind::Macro, node);
            }
        }
        "preproc_include" => {
            if let Some(path) = node.child_by_field_name("path") {
                let raw = text(&path, src);
                let angle = path.kind() == "system_lib_string";
                let inner = raw
                    .trim()
                    .trim_start_matches(['"', '<'])
                    .trim_end_matches(['"', '>']);
                if !inner.is_empty()
                    && matches!(path.kind(), "system_lib_string" | "string_literal")
                {
                    out.includes.push(Include {
                        path: inner.to_string(),
                        angle,
                        line: line(&node),
                    });
                }
            }
        }
        "identifier" | "field_identifier" | "type_identifier" | "namespace_identifier"
            if !names.contains(&node.start_byte()) =>
        {
            let spelled = text(&node, src);
            if !spelled.is_empty() {
                out.refs.push((spelled.to_string(), line(&node)));
            }
        }
        _ => {}
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Parsed {
        CppParser::new(Duration::from_secs(5)).parse(src).unwrap()
    }

    fn defs(p: &Parsed) -> Vec<(String, Kind, u32, u32)> {
        p.defs
            .iter()
            .map(|d| (d.name.clone(), d.kind, d.line, d.end_line))
            .collect()
    }

    #[test]
    fn definitions_references_and_includes() {
        let p = parse(
            r#"#include "geometry/point.h"
#include <vector>
#define SQUARE(x) ((x) * (x))
namespace geo {
struct Point { int x, y; int norm() const; };
int Point::norm() const {
    return SQUARE(x) + SQUARE(y);
}
template <typename T>
T twice(T v) { for (auto& e : v) { int k = e; } return v + v; }
enum class Color { Red, Green };
using Points = std::vector<Point>;
int counter = 0;
}
"#,
        );
        assert_eq!(
            defs(&p),
            vec![
                ("SQUARE".into(), Kind::Macro, 3, 3),
                ("Point".into(), Kind::Struct, 5, 5),
                ("x".into(), Kind::Field, 5, 5),
                ("y".into(), Kind::Field, 5, 5),
                ("norm".into(), Kind::Declaration, 5, 5),
                ("norm".into(), Kind::Function, 6, 8),
                ("twice".into(), Kind::Function, 9, 10),
                ("Color".into(), Kind::Enum, 11, 11),
                ("Red".into(), Kind::Enumerator, 11, 11),
                ("Green".into(), Kind::Enumerator, 11, 11),
                ("Points".into(), Kind::Typedef, 12, 12),
                ("counter".into(), Kind::Variable, 13, 13),
            ]
        );
        assert_eq!(
            p.includes,
            vec![
                Include {
                    path: "geometry/point.h".into(),
                    angle: false,
                    line: 1
                },
                Include {
                    path: "vector".into(),
                    angle: true,
                    line: 2
                },
            ]
        );
        let refs: Vec<&str> = p.refs.iter().map(|(n, _)| n.as_str()).collect();
        // The class name in `Point::norm` and uses in bodies are references; the names
        // being defined are not.
        assert!(refs.contains(&"Point"), "{refs:?}");
        assert!(refs.contains(&"SQUARE"), "{refs:?}");
        assert!(refs.contains(&"vector"), "{refs:?}");
        assert_eq!(
            refs.iter().filter(|r| **r == "twice").count(),
            0,
            "{refs:?}"
        );
        assert!(p.refs.contains(&("x".to_string(), 7)), "{:?}", p.refs);
        assert_eq!(p.locals, vec!["v", "e", "k"]);
    }

    #[test]
    fn broken_code_still_yields_symbols() {
        let p =
            parse("int ok(int a) { return a; }\nclass { ;;; }}} int later() { return ok(1); }\n");
        let names: Vec<&str> = p.defs.iter().map(|d| d.name.as_str()).collect();
        assert!(names.contains(&"ok"), "{names:?}");
        assert!(p.refs.iter().any(|(n, _)| n == "ok"));
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let depth = 20_000;
        let src = format!(
            "int f() {{ return {}1{}; }}",
            "(".repeat(depth),
            ")".repeat(depth)
        );
        let p = parse(&src);
        assert!(p.defs.iter().any(|d| d.name == "f"));
    }
}
