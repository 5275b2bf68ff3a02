//! Node selection: turn command-line specs such as `1-12 ~5 hv-west` into a
//! set of inventory nodes.
//!
//! Each argument is split on commas and ASCII whitespace into tokens (empty
//! pieces are ignored); tokens apply left to right:
//!
//! - a node's full name (`hv-west`, `fit05`) selects that node; this check
//!   comes first, so names may contain `-`;
//! - a number (`5`, `005`, `fit05`, `reboot05`: a prefix of ASCII letters,
//!   `_` or `.` is ignored) selects every node with that number;
//! - a range `1-12`, `fit4-reboot12` or, with a step, `4-16-2` selects the
//!   nodes whose number is in it (missing numbers are skipped, but a range
//!   that selects nothing is an error);
//! - `~TOKEN` removes what TOKEN would select from the selection so far.
//!
//! Every token must select at least one node of the inventory, and the final
//! selection must not be empty.

use crate::inventory::node::{Inventory, Node};

/// Why a node spec was rejected: the offending token and a helpful reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node spec `{token}`: {reason}")]
pub struct SpecError {
    pub token: String,
    pub reason: String,
}

impl SpecError {
    fn new(token: impl Into<String>, reason: impl Into<String>) -> Self {
        SpecError {
            token: token.into(),
            reason: reason.into(),
        }
    }
}

const NO_NODES_GIVEN: &str = "no nodes given (pass a spec, set NODES, or use -a)";
const EXCLUDE_FIRST: &str =
    "nothing selected yet to exclude from; start with a selection, e.g. -a ~5";
const SELECTS_NOTHING: &str = "the spec selects no node";
const RANGE_FORMS: &str = "ranges look like 1-12, fit01-fit12 or 4-16-2";

/// Select nodes from `inv` by spec tokens, applied left to right. Returns
/// indices into `inv.nodes`, deduplicated, in INVENTORY order.
///
/// `is_image` tells whether a token names an image in the repository; it is
/// only used to add a hint to the error for a token that selects no node.
///
/// When exclusions leave nothing selected, the error's token is the whole
/// spec (its tokens joined by single spaces).
pub fn select(
    inv: &Inventory,
    args: &[String],
    is_image: &dyn Fn(&str) -> bool,
) -> Result<Vec<usize>, SpecError> {
    let tokens: Vec<&str> = args
        .iter()
        .flat_map(|arg| arg.split(|c: char| c == ',' || c.is_ascii_whitespace()))
        .filter(|piece| !piece.is_empty())
        .collect();
    if tokens.is_empty() {
        return Err(SpecError::new("", NO_NODES_GIVEN));
    }

    let mut selected = vec![false; inv.nodes.len()];
    for (position, &token) in tokens.iter().enumerate() {
        apply(inv, &mut selected, token, position == 0).map_err(|reason| {
            let reason = if is_image(token) {
                format!(
                    "{reason}; an image named `{token}` is in the repository: did you forget -i?"
                )
            } else {
                reason
            };
            SpecError::new(token, reason)
        })?;
    }

    let chosen: Vec<usize> = selected
        .iter()
        .enumerate()
        .filter(|&(_, &on)| on)
        .map(|(i, _)| i)
        .collect();
    if chosen.is_empty() {
        return Err(SpecError::new(tokens.join(" "), SELECTS_NOTHING));
    }
    Ok(chosen)
}

/// Convenience: same as [`select`], returning the nodes cloned.
pub fn select_nodes(
    inv: &Inventory,
    args: &[String],
    is_image: &dyn Fn(&str) -> bool,
) -> Result<Vec<Node>, SpecError> {
    Ok(select(inv, args, is_image)?
        .into_iter()
        .map(|i| inv.nodes[i].clone())
        .collect())
}

/// Apply one token to the selection; the error is the reason only.
fn apply(inv: &Inventory, selected: &mut [bool], token: &str, first: bool) -> Result<(), String> {
    if let Some(inner) = token.strip_prefix('~') {
        if inner.is_empty() {
            return Err(
                "`~` alone excludes nothing; follow it with a node, number or range, e.g. ~5 or ~3-5"
                    .into(),
            );
        }
        if first {
            return Err(EXCLUDE_FIRST.into());
        }
        if inner.starts_with('~') {
            return Err("only one `~` is allowed: `~TOKEN` excludes what TOKEN selects".into());
        }
        for i in matches(inv, inner)? {
            selected[i] = false;
        }
    } else {
        for i in matches(inv, token)? {
            selected[i] = true;
        }
    }
    Ok(())
}

/// A parsed numeric token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbers {
    One(u32),
    Range { start: u32, end: u32, step: u32 },
}

impl Numbers {
    fn contains(self, n: u32) -> bool {
        match self {
            Numbers::One(m) => n == m,
            Numbers::Range { start, end, step } => {
                // step >= 1 and n >= start are checked before the modulo.
                start <= n && n <= end && (n - start).is_multiple_of(step)
            }
        }
    }

    fn describe(self) -> String {
        match self {
            Numbers::One(n) => format!("no node numbered {n}"),
            Numbers::Range {
                start,
                end,
                step: 1,
            } => format!("no node numbered in {start}-{end}"),
            Numbers::Range { start, end, step } => {
                format!("no node numbered in {start}-{end} (step {step})")
            }
        }
    }
}

/// The nodes a (non-excluding) token selects: never empty, else the reason.
fn matches(inv: &Inventory, token: &str) -> Result<Vec<usize>, String> {
    let by_name: Vec<usize> = inv
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, node)| node.name == token)
        .map(|(i, _)| i)
        .collect();
    if !by_name.is_empty() {
        return Ok(by_name);
    }

    if let Some(bad) = token.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "unexpected character {bad:?} (U+{:04X}); node specs use names, numbers, `-`, `~` and commas",
            u32::from(bad)
        ));
    }

    let numbers = parse_numbers(inv, token)?;
    let hits: Vec<usize> = inv
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, node)| node.number.is_some_and(|n| numbers.contains(n)))
        .map(|(i, _)| i)
        .collect();
    if hits.is_empty() {
        return Err(format!(
            "{} in the inventory ({})",
            numbers.describe(),
            number_span(inv)
        ));
    }
    Ok(hits)
}

/// Parse a token that is not a node name as a number or a range.
fn parse_numbers(inv: &Inventory, token: &str) -> Result<Numbers, String> {
    if !token.starts_with('-') && !token.bytes().any(|b| b.is_ascii_digit()) {
        // No number anywhere: most likely a mistyped name (`hv-north`).
        let ranges = if token.contains('-') {
            format!("; {RANGE_FORMS}")
        } else {
            String::new()
        };
        return Err(format!(
            "no node named `{token}` in the inventory ({}){ranges}",
            name_summary(inv)
        ));
    }
    if !token.contains('-') {
        return parse_number(token).map(Numbers::One).map_err(|e| match e {
            NumberError::TooLarge(reason) => reason,
            NumberError::Syntax => format!(
                "not a node name, a number (e.g. 5, 005, fit05) or a range ({RANGE_FORMS}); \
                 no node is named `{token}`"
            ),
        });
    }

    let parts: Vec<&str> = token.split('-').collect();
    if parts[0].is_empty() {
        let rest = &token[1..];
        let hint = if !rest.is_empty() && !rest.contains('-') {
            format!("; to exclude, write `~{rest}`")
        } else {
            String::new()
        };
        return Err(format!(
            "a range needs a start before `-` ({RANGE_FORMS}){hint}"
        ));
    }
    if parts.len() == 2 && parts[1].is_empty() {
        return Err(format!(
            "incomplete range: nothing after `-` ({RANGE_FORMS})"
        ));
    }
    if parts.len() > 3 {
        return Err(format!(
            "too many `-`: write START-END or START-END-STEP ({RANGE_FORMS})"
        ));
    }
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "empty part between `-` signs: write START-END or START-END-STEP ({RANGE_FORMS})"
        ));
    }

    let end_of = |piece: &str| {
        parse_number(piece).map_err(|e| match e {
            NumberError::TooLarge(reason) => reason,
            NumberError::Syntax => format!(
                "`{piece}` is not a node number; {RANGE_FORMS} (and no node is named `{token}`)"
            ),
        })
    };
    let start = end_of(parts[0])?;
    let end = end_of(parts[1])?;
    let step = match parts.get(2) {
        None => 1,
        Some(piece) => {
            if !piece.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "step `{piece}` is not a plain number; {RANGE_FORMS}"
                ));
            }
            piece
                .parse::<u32>()
                .map_err(|_| format!("number too large: {piece} (at most {})", u32::MAX))?
        }
    };
    if step == 0 {
        return Err("step must be at least 1 (e.g. 4-16-2)".into());
    }
    if start > end {
        return Err(format!("empty range: {start} is after {end}"));
    }
    Ok(Numbers::Range { start, end, step })
}

enum NumberError {
    /// Not `[A-Za-z_.]*[0-9]+`.
    Syntax,
    /// Digits that overflow a node number: the full reason.
    TooLarge(String),
}

/// `5`, `005`, `fit05`, `reboot.05` → the number; the letter prefix is ignored.
fn parse_number(piece: &str) -> Result<u32, NumberError> {
    let digits_at = piece
        .find(|c: char| !(c.is_ascii_alphabetic() || c == '_' || c == '.'))
        .unwrap_or(piece.len());
    let digits = &piece[digits_at..];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NumberError::Syntax);
    }
    digits.parse::<u32>().map_err(|_| {
        NumberError::TooLarge(format!("number too large: {digits} (at most {})", u32::MAX))
    })
}

/// What numbers the inventory has, for error messages: `it has 1-37`,
/// `it has 1-3, 5, 9-12`.
fn number_span(inv: &Inventory) -> String {
    if inv.nodes.is_empty() {
        return "it is empty".into();
    }
    let mut numbers: Vec<u32> = inv.nodes.iter().filter_map(|n| n.number).collect();
    numbers.sort_unstable();
    numbers.dedup();
    if numbers.is_empty() {
        return format!("none of its nodes has a number; {}", name_summary(inv));
    }
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for n in numbers {
        match runs.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(n) => *last = n,
            _ => runs.push((n, n)),
        }
    }
    let show = |&(a, b): &(u32, u32)| {
        if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        }
    };
    let shown: Vec<String> = if runs.len() <= 5 {
        runs.iter().map(show).collect()
    } else {
        let mut v: Vec<String> = runs[..3].iter().map(show).collect();
        v.push("…".into());
        v.push(show(&runs[runs.len() - 1]));
        v
    };
    format!("it has {}", shown.join(", "))
}

/// A few of the inventory's names, for error messages.
fn name_summary(inv: &Inventory) -> String {
    let names: Vec<&str> = inv.nodes.iter().map(|n| n.name.as_str()).collect();
    match names.len() {
        0 => "it is empty".into(),
        1..=6 => format!("it has {}", names.join(", ")),
        count => format!(
            "it has {count} nodes: {}, …, {}",
            names[..3].join(", "),
            names[count - 2..].join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::number_of;
    use proptest::prelude::*;

    fn node(name: &str) -> Node {
        Node {
            name: name.to_string(),
            number: number_of(name),
            address: name.to_string(),
            ..Node::default()
        }
    }

    /// fit01..fit37 (indices 0..=36), then hv-west (37) and hv-east (38).
    fn lab() -> Inventory {
        let mut nodes: Vec<Node> = (1..=37).map(|i| node(&format!("fit{i:02}"))).collect();
        nodes.push(node("hv-west"));
        nodes.push(node("hv-east"));
        Inventory::new(nodes)
    }

    fn no_images(_: &str) -> bool {
        false
    }

    fn args(spec: &[&str]) -> Vec<String> {
        spec.iter().map(|s| s.to_string()).collect()
    }

    /// Numbers of the nodes `spec` selects in `lab()` (one arg, split as usual).
    fn numbers(spec: &str) -> Vec<u32> {
        let inv = lab();
        select(&inv, &args(&[spec]), &no_images)
            .unwrap_or_else(|e| panic!("{spec:?}: {e}"))
            .into_iter()
            .map(|i| inv.nodes[i].number.expect("numbered node"))
            .collect()
    }

    fn names(spec: &[&str]) -> Vec<String> {
        select_nodes(&lab(), &args(spec), &no_images)
            .unwrap_or_else(|e| panic!("{spec:?}: {e}"))
            .into_iter()
            .map(|n| n.name)
            .collect()
    }

    fn err(spec: &[&str]) -> SpecError {
        match select(&lab(), &args(spec), &no_images) {
            Ok(sel) => panic!("{spec:?} should fail, selected {sel:?}"),
            Err(e) => e,
        }
    }

    /// The error names `token` and its reason contains `phrase`.
    fn assert_err(spec: &[&str], token: &str, phrase: &str) {
        let e = err(spec);
        assert_eq!(e.token, token, "{spec:?}: {e}");
        assert!(e.reason.contains(phrase), "{spec:?}: {e}");
    }

    // ---- tokenizing ----

    #[test]
    fn args_split_on_commas_and_whitespace() {
        assert_eq!(numbers("1,2 3\t4\n5"), vec![1, 2, 3, 4, 5]);
        assert_eq!(
            names(&["1,", ",,2", "  ", "3 ,4"]),
            ["fit01", "fit02", "fit03", "fit04"]
        );
    }

    #[test]
    fn no_tokens_is_an_error() {
        for spec in [&[][..], &[""], &[" , ,\t"], &["", ","]] {
            let e = err(spec);
            assert_eq!(e.token, "");
            assert_eq!(
                e.reason,
                "no nodes given (pass a spec, set NODES, or use -a)"
            );
        }
    }

    // ---- names ----

    #[test]
    fn full_name_selects_that_node() {
        assert_eq!(names(&["hv-west"]), ["hv-west"]);
        assert_eq!(names(&["fit05"]), ["fit05"]);
        assert_eq!(names(&["hv-east,hv-west"]), ["hv-west", "hv-east"]);
    }

    #[test]
    fn name_check_comes_before_range_parsing() {
        // A node named like a range is selected by name, not as a range.
        let inv = Inventory::new(vec![node("fit01"), node("fit02"), node("1-2")]);
        assert_eq!(select(&inv, &args(&["1-2"]), &no_images).unwrap(), [2]);
        // A node named "5" is selected by name, not every node numbered 5.
        let inv = Inventory::new(vec![node("fit05"), node("5")]);
        assert_eq!(select(&inv, &args(&["5"]), &no_images).unwrap(), [1]);
    }

    #[test]
    fn unknown_name_is_an_error_listing_some_names() {
        let e = err(&["hv-north"]);
        assert_eq!(e.token, "hv-north");
        assert!(e.reason.contains("hv-north"), "{e}");
        let e = err(&["foo"]);
        assert_eq!(e.token, "foo");
        assert!(e.reason.contains("no node named `foo`"), "{e}");
        assert!(e.reason.contains("fit01"), "{e}");
        assert!(e.reason.contains("hv-east"), "{e}");
        assert!(
            e.reason
                .contains("it has 39 nodes: fit01, fit02, fit03, …, hv-west, hv-east"),
            "{e}"
        );
    }

    // ---- numbers ----

    #[test]
    fn number_ignores_letter_prefix_and_leading_zeros() {
        for spec in [
            "5",
            "005",
            "fit05",
            "reboot05",
            "fit5",
            "x_y.5",
            "0000000000000000000005",
        ] {
            assert_eq!(numbers(spec), vec![5], "{spec}");
        }
    }

    #[test]
    fn number_selects_every_node_with_it() {
        let inv = Inventory::new(vec![node("fit05"), node("fit06"), node("reboot05")]);
        assert_eq!(select(&inv, &args(&["5"]), &no_images).unwrap(), [0, 2]);
        assert_eq!(select(&inv, &args(&["reboot05"]), &no_images).unwrap(), [2]);
        assert_eq!(select(&inv, &args(&["fit5"]), &no_images).unwrap(), [0, 2]);
    }

    #[test]
    fn missing_number_is_an_error_with_the_span() {
        let e = err(&["40"]);
        assert_eq!(e.token, "40");
        assert_eq!(
            e.reason,
            "no node numbered 40 in the inventory (it has 1-37)"
        );
        assert_err(&["1", "fit0"], "fit0", "no node numbered 0");
    }

    #[test]
    fn span_shows_gaps() {
        let inv = Inventory::new(vec![node("fit01"), node("fit02"), node("fit05"), node("x")]);
        let e = select(&inv, &args(&["3"]), &no_images).unwrap_err();
        assert!(e.reason.contains("it has 1-2, 5"), "{e}");
        let inv = Inventory::new(vec![node("hv-west")]);
        let e = select(&inv, &args(&["3"]), &no_images).unwrap_err();
        assert!(e.reason.contains("none of its nodes has a number"), "{e}");
        assert!(e.reason.contains("hv-west"), "{e}");
        let e = select(&Inventory::default(), &args(&["3"]), &no_images).unwrap_err();
        assert!(e.reason.contains("it is empty"), "{e}");
    }

    #[test]
    fn number_too_large() {
        assert_err(
            &["99999999999999999999"],
            "99999999999999999999",
            "number too large",
        );
        assert_err(&["fit4294967296"], "fit4294967296", "number too large");
        assert_err(
            &["1-99999999999999999999"],
            "1-99999999999999999999",
            "number too large",
        );
        assert_err(
            &["1-5-99999999999999999999"],
            "1-5-99999999999999999999",
            "number too large",
        );
        // u32::MAX itself parses; it just selects nothing here.
        assert_err(&["4294967295"], "4294967295", "no node numbered 4294967295");
    }

    #[test]
    fn bad_number_syntax() {
        assert_err(&["5x"], "5x", "not a node name, a number");
        assert_err(&["fit05x"], "fit05x", "not a node name, a number");
        assert_err(&["fit5-"], "fit5-", "nothing after `-`");
        assert_err(&["fit-"], "fit-", "no node named `fit-`");
        assert_err(&["+5"], "+5", "not a node name, a number");
    }

    // ---- ranges ----

    #[test]
    fn ranges() {
        assert_eq!(numbers("1-12"), (1..=12).collect::<Vec<_>>());
        assert_eq!(numbers("fit4-reboot12"), (4..=12).collect::<Vec<_>>());
        assert_eq!(numbers("004-fit6"), vec![4, 5, 6]);
        assert_eq!(numbers("7-7"), vec![7]);
        assert_eq!(numbers("4-16-2"), vec![4, 6, 8, 10, 12, 14, 16]);
        assert_eq!(numbers("4-15-2"), vec![4, 6, 8, 10, 12, 14]);
        assert_eq!(numbers("1-37-36"), vec![1, 37]);
        assert_eq!(numbers("1-37-100"), vec![1]);
    }

    #[test]
    fn range_skips_missing_numbers() {
        assert_eq!(numbers("30-40"), (30..=37).collect::<Vec<_>>());
        let inv = Inventory::new(vec![node("fit01"), node("fit03"), node("fit09")]);
        assert_eq!(select(&inv, &args(&["2-9"]), &no_images).unwrap(), [1, 2]);
    }

    #[test]
    fn huge_ranges_do_not_allocate() {
        assert_eq!(numbers("1-4000000000").len(), 37);
        assert_eq!(numbers("0-4294967295").len(), 37);
        assert_eq!(numbers("1-4294967295-4294967295"), vec![1]);
        assert_eq!(numbers("37-4294967295-4294967295"), vec![37]);
    }

    #[test]
    fn range_selecting_nothing_is_an_error() {
        let e = err(&["38-40"]);
        assert_eq!(e.token, "38-40");
        assert_eq!(
            e.reason,
            "no node numbered in 38-40 in the inventory (it has 1-37)"
        );
        assert_err(
            &["38-50-2"],
            "38-50-2",
            "no node numbered in 38-50 (step 2)",
        );
        let inv = Inventory::new(vec![node("fit01"), node("fit03")]);
        let e = select(&inv, &args(&["2-2"]), &no_images).unwrap_err();
        assert_eq!(
            e.reason,
            "no node numbered in 2-2 in the inventory (it has 1, 3)"
        );
        let e = select(&inv, &args(&["1", "~2-3-2"]), &no_images).unwrap_err();
        assert_eq!(e.token, "~2-3-2");
        assert!(e.reason.contains("no node numbered in 2-3 (step 2)"), "{e}");
    }

    #[test]
    fn bad_range_syntax() {
        assert_err(&["1-"], "1-", "incomplete range");
        assert_err(&["-3"], "-3", "needs a start");
        assert_err(&["-3"], "-3", "to exclude, write `~3`");
        assert_err(&["-"], "-", "needs a start");
        assert_err(&["1--3"], "1--3", "empty part");
        assert_err(&["1-3-"], "1-3-", "empty part");
        assert_err(&["1-2-3-4"], "1-2-3-4", "too many `-`");
        assert_err(&["a-b"], "a-b", "no node named `a-b`");
        assert_err(&["a-b"], "a-b", "ranges look like");
        assert_err(&["1-b"], "1-b", "`b` is not a node number");
        assert_err(&["1-b"], "1-b", "no node is named `1-b`");
        assert_err(&["a-3"], "a-3", "`a` is not a node number");
        assert_err(&["4-2"], "4-2", "empty range: 4 is after 2");
        assert_err(&["fit4-fit2"], "fit4-fit2", "empty range: 4 is after 2");
        assert_err(&["4-16-0"], "4-16-0", "step must be at least 1");
        assert_err(&["4-16-x2"], "4-16-x2", "step `x2` is not a plain number");
    }

    #[test]
    fn non_ascii_garbage_is_an_error() {
        assert_err(&["fït05"], "fït05", "unexpected character 'ï'");
        assert_err(&["1-５"], "1-５", "unexpected character");
        assert_err(&["5\u{a0}6"], "5\u{a0}6", "U+00A0");
        assert_err(&["1", "~\u{0}"], "~\u{0}", "unexpected character");
    }

    // ---- exclusions ----

    #[test]
    fn exclusions_apply_left_to_right() {
        assert_eq!(numbers("1-10 ~3-5 4"), vec![1, 2, 4, 6, 7, 8, 9, 10]);
        assert_eq!(numbers("1-10,~3-5"), vec![1, 2, 6, 7, 8, 9, 10]);
        assert_eq!(numbers("1-10 ~1-10-2"), vec![2, 4, 6, 8, 10]);
        assert_eq!(numbers("1-3 ~fit02"), vec![1, 3]);
        assert_eq!(numbers("4 ~4 4"), vec![4]);
        assert_eq!(
            names(&["hv-west", "hv-east", "1", "~hv-west"]),
            ["fit01", "hv-east"]
        );
    }

    #[test]
    fn excluding_something_unselected_is_fine() {
        assert_eq!(numbers("1-3 ~20"), vec![1, 2, 3]);
        assert_eq!(names(&["hv-west ~hv-east"]), ["hv-west"]);
    }

    #[test]
    fn exclusion_must_match_the_inventory() {
        assert_err(&["1-3", "~40"], "~40", "no node numbered 40");
        assert_err(&["1-3 ~hv-north"], "~hv-north", "no node named `hv-north`");
        assert_err(&["1-3 ~38-40"], "~38-40", "no node numbered in 38-40");
        assert_err(&["1-3 ~4-2"], "~4-2", "empty range: 4 is after 2");
    }

    #[test]
    fn exclusion_first_is_an_error() {
        let e = err(&["~5", "1-10"]);
        assert_eq!(e.token, "~5");
        assert_eq!(
            e.reason,
            "nothing selected yet to exclude from; start with a selection, e.g. -a ~5"
        );
        assert_err(&[" ,~hv-west"], "~hv-west", "nothing selected yet");
    }

    #[test]
    fn bad_exclusion_syntax() {
        assert_err(&["1", "~"], "~", "`~` alone");
        assert_err(&["~"], "~", "`~` alone");
        assert_err(&["1 ~~1"], "~~1", "only one `~`");
        assert_err(&["1 ~-1"], "~-1", "needs a start");
    }

    #[test]
    fn empty_final_selection_is_an_error() {
        let e = err(&["5", "~5"]);
        assert_eq!(e.token, "5 ~5");
        assert_eq!(e.reason, "the spec selects no node");
        assert_err(&["1-3,~1-3"], "1-3 ~1-3", "the spec selects no node");
        assert_err(&["hv-west ~hv-west"], "hv-west ~hv-west", "selects no node");
    }

    // ---- image hint ----

    #[test]
    fn image_hint_for_tokens_that_are_images() {
        let is_image = |t: &str| t == "ubuntu-24.04" || t == "foo";
        let e = select(&lab(), &args(&["1", "ubuntu-24.04"]), &is_image).unwrap_err();
        assert_eq!(e.token, "ubuntu-24.04");
        assert!(
            e.reason.ends_with(
                "; an image named `ubuntu-24.04` is in the repository: did you forget -i?"
            ),
            "{e}"
        );
        let e = select(&lab(), &args(&["foo"]), &is_image).unwrap_err();
        assert!(e.reason.starts_with("no node named `foo`"), "{e}");
        assert!(e.reason.contains("did you forget -i?"), "{e}");
        // No hint for a token that is not an image.
        let e = select(&lab(), &args(&["bar"]), &is_image).unwrap_err();
        assert!(!e.reason.contains("-i"), "{e}");
        // Tokens that select nodes are never checked against images.
        let all = |_: &str| true;
        assert_eq!(select(&lab(), &args(&["5"]), &all).unwrap(), [4]);
    }

    #[test]
    fn error_display_names_token_and_reason() {
        let e = err(&["40"]);
        assert_eq!(
            e.to_string(),
            "node spec `40`: no node numbered 40 in the inventory (it has 1-37)"
        );
    }

    #[test]
    fn result_is_in_inventory_order_and_deduplicated() {
        assert_eq!(numbers("5 3 1-4 3"), vec![1, 2, 3, 4, 5]);
        let inv = lab();
        let sel = select(
            &inv,
            &args(&["hv-east", "2", "hv-west", "fit02"]),
            &no_images,
        )
        .unwrap();
        assert_eq!(sel, [1, 37, 38]);
    }

    #[test]
    fn select_nodes_clones_the_selected_nodes() {
        let inv = lab();
        let nodes = select_nodes(&inv, &args(&["3-4"]), &no_images).unwrap();
        assert_eq!(nodes, [inv.nodes[2].clone(), inv.nodes[3].clone()]);
        assert!(select_nodes(&inv, &args(&["40"]), &no_images).is_err());
    }

    // ---- properties ----

    /// Strings close to the grammar, so they exercise more than the
    /// "unknown name" path.
    fn spec_like() -> impl Strategy<Value = String> {
        "[~0-9a-z, _.\\-]{0,16}|(~?(fit)?[0-9]{1,3}(-[0-9]{1,3}(-[0-9]{1,2})?)?[ ,]?){1,5}"
    }

    /// A naive model of `lab()` for purely numeric tokens: `Some(numbers)`
    /// for a token, `None` if it selects nothing (an error).
    fn model_token(token: &str) -> Option<Vec<u32>> {
        let inner = token.trim_start_matches('~').trim_start_matches("fit");
        let parts: Vec<u64> = inner.split('-').map(|p| p.parse().unwrap()).collect();
        let (start, end, step) = match parts[..] {
            [n] => (n, n, 1),
            [a, b] => (a, b, 1),
            [a, b, s] => (a, b, s),
            _ => unreachable!(),
        };
        if step == 0 || start > end {
            return None;
        }
        let hit: Vec<u32> = (1..=37u32)
            .filter(|&n| {
                let n = u64::from(n);
                start <= n && n <= end && (n - start).is_multiple_of(step)
            })
            .collect();
        (!hit.is_empty()).then_some(hit)
    }

    fn numeric_token() -> impl Strategy<Value = String> {
        (
            any::<bool>(),
            any::<bool>(),
            0u32..45,
            prop::option::of((0u32..45, prop::option::of(0u32..6))),
        )
            .prop_map(|(tilde, fit, a, rest)| {
                let mut t = String::new();
                if tilde {
                    t.push('~');
                }
                if fit {
                    t.push_str("fit");
                }
                t.push_str(&a.to_string());
                if let Some((b, step)) = rest {
                    t.push_str(&format!("-{b}"));
                    if let Some(s) = step {
                        t.push_str(&format!("-{s}"));
                    }
                }
                t
            })
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_strings(
            raw in prop::collection::vec(any::<String>(), 0..4),
            near in prop::collection::vec(spec_like(), 0..4),
        ) {
            let inv = lab();
            let is_image = |t: &str| t.len().is_multiple_of(2);
            let _ = select(&inv, &raw, &is_image);
            let _ = select(&inv, &near, &is_image);
            let _ = select(&Inventory::default(), &near, &is_image);
            let _ = select_nodes(&inv, &near, &no_images);
        }

        #[test]
        fn result_is_sorted_and_duplicate_free(
            spec in prop::collection::vec(spec_like(), 0..4),
        ) {
            let inv = lab();
            if let Ok(sel) = select(&inv, &spec, &no_images) {
                prop_assert!(!sel.is_empty());
                prop_assert!(sel.windows(2).all(|w| w[0] < w[1]), "{:?}", sel);
                prop_assert!(sel.iter().all(|&i| i < inv.nodes.len()));
            }
        }

        #[test]
        fn range_selects_every_number_in_it(a in 1u32..=37, b in 1u32..=37) {
            let (a, b) = (a.min(b), a.max(b));
            let sel = select(&lab(), &args(&[&format!("{a}-{b}")]), &no_images).unwrap();
            prop_assert_eq!(sel.len() as u32, b - a + 1);
            prop_assert_eq!(sel, ((a - 1) as usize..b as usize).collect::<Vec<_>>());
        }

        #[test]
        fn x_then_not_x_selects_nothing(
            n in 1u32..=37,
            form in prop::sample::select(vec!["{}", "{:03}", "fit{:02}", "reboot{}"]),
        ) {
            let x = form.replace("{:03}", &format!("{n:03}"))
                .replace("{:02}", &format!("{n:02}"))
                .replace("{}", &n.to_string());
            let e = select(&lab(), &args(&[&x, &format!("~{x}")]), &no_images).unwrap_err();
            prop_assert_eq!(e.token, format!("{x} ~{x}"));
            prop_assert_eq!(e.reason, "the spec selects no node");
        }

        #[test]
        fn numeric_specs_match_a_naive_model(
            tokens in prop::collection::vec(numeric_token(), 1..6),
        ) {
            let inv = lab();
            let got = select(&inv, &tokens, &no_images);
            let mut want = std::collections::BTreeSet::new();
            let mut failure = None;
            for (i, token) in tokens.iter().enumerate() {
                let excl = token.starts_with('~');
                if excl && i == 0 {
                    failure = Some(token.clone());
                    break;
                }
                match model_token(token) {
                    None => {
                        failure = Some(token.clone());
                        break;
                    }
                    Some(hit) if excl => hit.iter().for_each(|n| { want.remove(n); }),
                    Some(hit) => want.extend(hit),
                }
            }
            match (got, failure) {
                (Err(e), Some(token)) => prop_assert_eq!(e.token, token),
                (Err(e), None) => {
                    prop_assert!(want.is_empty(), "{}", e);
                    prop_assert_eq!(e.reason, "the spec selects no node");
                }
                (Ok(sel), None) => {
                    let got: Vec<u32> = sel.iter().map(|&i| inv.nodes[i].number.unwrap()).collect();
                    prop_assert_eq!(got, want.into_iter().collect::<Vec<_>>());
                }
                (Ok(sel), Some(token)) => prop_assert!(false, "expected error at {token}, got {sel:?}"),
            }
        }
    }
}
