//! The profile model's JSON, checked as every reader checks a profile,
//! and rendered.
//!
//! Byte mutations rarely keep JSON parseable, let alone reach a number at
//! the edge of its type in two rows that add up: half the mutations here
//! edit the parsed JSON instead (edge numbers, duplicated rows, dropped
//! and copied values), knowing nothing of the model.
#![no_main]

use libfuzzer_sys::{fuzz_mutator, fuzz_target, fuzzer_mutate};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let _ = profiler::fuzzing::profile_json(data);
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let mut rng = Rng(u64::from(seed) | 1);
    if rng.below(2) == 0 {
        return fuzzer_mutate(data, size, max_size);
    }
    let Ok(mut json) = serde_json::from_slice::<Value>(&data[..size]) else {
        return fuzzer_mutate(data, size, max_size);
    };
    for _ in 0..=rng.below(3) {
        mutate(&mut json, &mut rng);
    }
    match serde_json::to_vec(&json) {
        Ok(out) if out.len() <= max_size => {
            data[..out.len()].copy_from_slice(&out);
            out.len()
        }
        _ => fuzzer_mutate(data, size, max_size),
    }
});

/// xorshift64: deterministic from libFuzzer's seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }
}

/// Numbers where integer types end, and where a sum of two overflows.
const EDGES: &[i128] = &[
    0,
    1,
    -1,
    2,
    63,
    64,
    65,
    1 << 31,
    u32::MAX as i128,
    u32::MAX as i128 + 1,
    1 << 53,
    i64::MAX as i128,
    i64::MAX as i128 + 1,
    u64::MAX as i128 / 2 + 1,
    u64::MAX as i128 - 1,
    u64::MAX as i128,
    i64::MIN as i128,
];

const STRINGS: &[&str] = &[
    "",
    ";",
    " ",
    "a b;c\nd",
    "<script>x</script>",
    "\u{2013}\u{0}",
    "[unknown]",
    "_raw_spin_lock_[k]",
];

/// Every value of the tree, depth first, as paths of indices.
fn paths(v: &Value, at: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    out.push(at.clone());
    let children: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) => o.values().collect(),
        _ => return,
    };
    for (i, c) in children.into_iter().enumerate() {
        at.push(i);
        paths(c, at, out);
        at.pop();
    }
}

fn at_path<'a>(mut v: &'a mut Value, path: &[usize]) -> &'a mut Value {
    for &i in path {
        v = match v {
            Value::Array(a) => &mut a[i],
            Value::Object(o) => o.values_mut().nth(i).expect("path from paths()"),
            _ => unreachable!("path from paths()"),
        };
    }
    v
}

fn mutate(json: &mut Value, rng: &mut Rng) {
    let mut all = Vec::new();
    paths(json, &mut Vec::new(), &mut all);
    let path = all[rng.below(all.len())].clone();
    let donor = at_path(json, &all[rng.below(all.len())].clone()).clone();
    let v = at_path(json, &path);
    match v {
        Value::Number(_) => {
            let n = EDGES[rng.below(EDGES.len())];
            *v = if n < 0 {
                Value::from(i64::try_from(n).unwrap_or(i64::MIN))
            } else {
                Value::from(u64::try_from(n).unwrap_or(u64::MAX))
            };
        }
        Value::String(s) => match rng.below(3) {
            0 => STRINGS[rng.below(STRINGS.len())].clone_into(s),
            1 => *s = s.repeat(1 + rng.below(8)),
            _ => *v = donor,
        },
        Value::Array(a) if !a.is_empty() => {
            let i = rng.below(a.len());
            match rng.below(4) {
                // The same row twice: same window, same stack.
                0 => {
                    let row = a[i].clone();
                    a.push(row);
                }
                1 => {
                    a.remove(i);
                }
                2 => {
                    let j = rng.below(a.len());
                    a.swap(i, j);
                }
                _ => a[i] = donor,
            }
        }
        Value::Object(o) if !o.is_empty() => {
            let key = o
                .keys()
                .nth(rng.below(o.len()))
                .cloned()
                .unwrap_or_default();
            if rng.below(2) == 0 {
                o.remove(&key);
            } else {
                o.insert(key, donor);
            }
        }
        _ => *v = donor,
    }
}
