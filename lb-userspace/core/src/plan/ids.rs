//! Free-id bookkeeping: which service and backend ids no map entry uses.

use std::collections::BTreeMap;

/// The ids of one id space (1..=u32::MAX) that are free, as disjoint,
/// non-adjacent intervals: the smallest free id is the start of the first
/// interval, and marking one id used or free costs O(log intervals), whatever
/// the number of ids in use. Id 0 is never handed out ("no id").
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FreeIds {
    /// start -> end, both inclusive.
    free: BTreeMap<u32, u32>,
}

impl Default for FreeIds {
    fn default() -> Self {
        Self {
            free: BTreeMap::from([(1, u32::MAX)]),
        }
    }
}

impl FreeIds {
    /// The interval holding `id`, if `id` is free.
    fn interval(&self, id: u32) -> Option<(u32, u32)> {
        let (&start, &end) = self.free.range(..=id).next_back()?;
        (end >= id).then_some((start, end))
    }

    /// Marks `id` used (no-op if it already is).
    pub fn take(&mut self, id: u32) {
        let Some((start, end)) = self.interval(id) else {
            return;
        };
        self.free.remove(&start);
        if start < id {
            self.free.insert(start, id - 1);
        }
        if id < end {
            self.free.insert(id + 1, end);
        }
    }

    /// Marks `id` free (no-op if it already is, or if it is 0).
    pub fn release(&mut self, id: u32) {
        if id == 0 || self.interval(id).is_some() {
            return;
        }
        let mut start = id;
        let mut end = id;
        if let Some((&s, &e)) = self.free.range(..id).next_back() {
            if e == id - 1 {
                start = s;
            }
        }
        if id < u32::MAX {
            if let Some(e) = self.free.get(&(id + 1)).copied() {
                self.free.remove(&(id + 1));
                end = e;
            }
        }
        self.free.insert(start, end);
    }

    /// Free ids in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.free.iter().flat_map(|(&s, &e)| s..=e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn smallest_free_id_follows_takes_and_releases() {
        let mut f = FreeIds::default();
        assert_eq!(f.iter().next(), Some(1));
        for id in [1, 2, 3, 5] {
            f.take(id);
        }
        assert_eq!(f.iter().take(3).collect::<Vec<_>>(), vec![4, 6, 7]);
        f.take(3); // already used
        f.release(2);
        assert_eq!(f.iter().next(), Some(2));
        f.release(3);
        f.release(1);
        f.release(1); // already free
        assert_eq!(f.iter().take(4).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        f.take(u32::MAX);
        f.release(u32::MAX);
        f.release(0);
        f.take(0);
        f.release(5);
        assert_eq!(f, FreeIds::default());
    }

    proptest::proptest! {
        /// Against a plain set: the smallest free ids are always right.
        #[test]
        fn matches_a_set_model(ops in proptest::collection::vec((proptest::bool::ANY, 0u32..40), 0..400)) {
            let mut f = FreeIds::default();
            let mut used = BTreeSet::new();
            for (take, id) in ops {
                if take {
                    f.take(id);
                    if id != 0 {
                        used.insert(id);
                    }
                } else {
                    f.release(id);
                    used.remove(&id);
                }
                let want: Vec<u32> = (1..).filter(|i| !used.contains(i)).take(5).collect();
                proptest::prop_assert_eq!(f.iter().take(5).collect::<Vec<_>>(), want);
            }
        }
    }
}
