//! Seeded shuffle, sample and stratified split of row tables.
//!
//! All randomness is [`SplitMix64`] seeded by the user's seed, so the same input and seed give
//! the same rows on every machine.
//!
//! Row order, by operation:
//! - [`shuffle`]: a Fisher–Yates permutation of the input order.
//! - [`sample`]: the first `n` rows of `shuffle(input, seed)` (so `sample(x, 100, s)` is a prefix
//!   of `sample(x, 200, s)`); asking for more rows than there are is an error.
//! - [`stratified_split`]: each class (in class-list order) is sorted by `row_id`, shuffled with
//!   the one seeded stream, and cut into consecutive parts in the order the parts are declared;
//!   part sizes per class are rounded by largest remainder (ties go to the earlier part), so each
//!   class's counts sum exactly. Each part's rows are then sorted by `row_id`. Because classes
//!   are sorted before shuffling, the split does not depend on the input's row order.

use super::{DataError, RowRecord, RowTable, SplitMix64};

/// One part of a split (`train`, `test`, `validation`, …) and its share of every class.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SplitPart {
    pub name: String,
    pub ratio: f64,
}

/// A stratified split.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SplitSpec {
    pub parts: Vec<SplitPart>,
    pub seed: u64,
}

/// Ratios may be off by this much from summing to 1 (decimal literals like 0.7 + 0.2 + 0.1).
const RATIO_TOLERANCE: f64 = 1e-6;

/// File name of a split part in the split stage's cache entry (`train.parquet`, …).
pub fn part_file_name(part: &str) -> String {
    format!("{part}.parquet")
}

/// A seeded permutation of `table`'s rows.
pub fn shuffle(table: &RowTable, seed: u64) -> RowTable {
    let mut rows = table.rows.clone();
    SplitMix64::new(seed).shuffle(&mut rows);
    RowTable {
        rows,
        classes: table.classes.clone(),
    }
}

/// `n` rows of `table` chosen by `seed`; errors when `n` exceeds the rows available.
pub fn sample(table: &RowTable, n: usize, seed: u64) -> Result<RowTable, DataError> {
    if n > table.rows.len() {
        return Err(DataError::SampleTooLarge {
            requested: n,
            available: table.rows.len(),
        });
    }
    let mut shuffled = shuffle(table, seed);
    shuffled.rows.truncate(n);
    Ok(shuffled)
}

/// Splits `table` into `spec.parts`, stratified by label; returns the parts in declared order.
pub fn stratified_split(
    table: &RowTable,
    spec: &SplitSpec,
) -> Result<Vec<(String, RowTable)>, DataError> {
    validate(spec)?;
    let mut rng = SplitMix64::new(spec.seed);
    let mut parts: Vec<Vec<RowRecord>> = vec![Vec::new(); spec.parts.len()];
    // Class order: the class list, then any label outside it (sorted), so grouping is total.
    let mut order: Vec<String> = table.classes.clone();
    let mut extra: Vec<String> = table
        .rows
        .iter()
        .map(|r| r.label.clone())
        .filter(|l| !table.classes.contains(l))
        .collect();
    extra.sort();
    extra.dedup();
    order.extend(extra);
    for class in &order {
        let mut members: Vec<&RowRecord> =
            table.rows.iter().filter(|r| &r.label == class).collect();
        if members.is_empty() {
            continue;
        }
        members.sort_by(|a, b| a.row_id.cmp(&b.row_id));
        rng.shuffle(&mut members);
        let counts = allocate(members.len(), &spec.parts);
        let mut next = members.into_iter();
        for (part, count) in parts.iter_mut().zip(counts) {
            part.extend(next.by_ref().take(count).cloned());
        }
    }
    Ok(spec
        .parts
        .iter()
        .zip(parts)
        .map(|(part, mut rows)| {
            rows.sort_by(|a, b| a.row_id.cmp(&b.row_id));
            (
                part.name.clone(),
                RowTable {
                    rows,
                    classes: table.classes.clone(),
                },
            )
        })
        .collect())
}

fn validate(spec: &SplitSpec) -> Result<(), DataError> {
    if spec.parts.is_empty() {
        return Err(DataError::Param(
            "a split needs at least one part".to_owned(),
        ));
    }
    for (i, part) in spec.parts.iter().enumerate() {
        if !(part.ratio.is_finite() && part.ratio >= 0.0) {
            return Err(DataError::Param(format!(
                "split part `{}` has ratio {}, expected a number in 0..=1",
                part.name, part.ratio
            )));
        }
        if spec.parts[..i].iter().any(|p| p.name == part.name) {
            return Err(DataError::Param(format!(
                "split part `{}` appears twice",
                part.name
            )));
        }
    }
    let sum: f64 = spec.parts.iter().map(|p| p.ratio).sum();
    if (sum - 1.0).abs() > RATIO_TOLERANCE {
        return Err(DataError::Param(format!(
            "split ratios sum to {sum}, expected 1"
        )));
    }
    Ok(())
}

/// Largest-remainder rounding of `n * ratio` per part; ties go to the earlier part.
fn allocate(n: usize, parts: &[SplitPart]) -> Vec<usize> {
    let exact: Vec<f64> = parts.iter().map(|p| n as f64 * p.ratio).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut left = n.saturating_sub(counts.iter().sum());
    let mut by_remainder: Vec<usize> = (0..parts.len()).collect();
    // Stable sort keeps declared order among equal remainders.
    by_remainder.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.partial_cmp(&ra).unwrap_or(std::cmp::Ordering::Equal)
    });
    for i in by_remainder {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str, ratio: f64) -> SplitPart {
        SplitPart {
            name: name.to_owned(),
            ratio,
        }
    }

    #[test]
    fn allocation_sums_exactly() {
        let parts = [
            part("train", 0.7),
            part("validation", 0.2),
            part("test", 0.1),
        ];
        assert_eq!(allocate(10, &parts), vec![7, 2, 1]);
        assert_eq!(allocate(1, &parts), vec![1, 0, 0]);
        assert_eq!(allocate(3, &[part("a", 0.5), part("b", 0.5)]), vec![2, 1]);
        for n in 0..200 {
            assert_eq!(allocate(n, &parts).iter().sum::<usize>(), n);
        }
    }

    #[test]
    fn bad_ratios_are_errors() {
        let table = RowTable::default();
        for parts in [
            vec![part("a", 0.5)],
            vec![part("a", -0.5), part("b", 1.5)],
            vec![],
        ] {
            assert!(stratified_split(&table, &SplitSpec { parts, seed: 1 }).is_err());
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(100))]

        #[test]
        fn split_partitions_every_class_exactly(
            sizes in proptest::collection::vec(0usize..40, 1..5),
            first in 1u32..9,
            seed in proptest::num::u64::ANY,
        ) {
            let classes: Vec<String> = (0..sizes.len()).map(|c| format!("c{c}")).collect();
            let rows: Vec<RowRecord> = sizes
                .iter()
                .enumerate()
                .flat_map(|(c, &n)| {
                    (0..n).map(move |i| RowRecord {
                        row_id: format!("c{c}/{i}"),
                        image_id: String::new(),
                        label: format!("c{c}"),
                        label_index: c as u32,
                        image_error: None,
                    })
                })
                .collect();
            let table = RowTable { rows, classes };
            let a = f64::from(first) / 10.0;
            let spec = SplitSpec { parts: vec![part("train", a), part("test", 1.0 - a)], seed };
            let parts = stratified_split(&table, &spec).unwrap();
            for (c, &n) in sizes.iter().enumerate() {
                let label = format!("c{c}");
                let got: Vec<usize> = parts
                    .iter()
                    .map(|(_, t)| t.rows.iter().filter(|r| r.label == label).count())
                    .collect();
                proptest::prop_assert_eq!(got.iter().sum::<usize>(), n);
                proptest::prop_assert!((got[0] as f64 - n as f64 * a).abs() <= 1.0);
            }
        }
    }
}
