//! The user groups of the paper's Table 4, by activity: **cold** users (the least active tenth)
//! and **heavy** users (the most active tenth). Activity is [`TaskData::activity`]; the tenths are
//! cut at the 10th and 90th percentiles of all task users' activity (ties go into the group, so a
//! group can hold more than a tenth).
//!
//! Table 4's **new** users (no earlier behaviour in the task's own service) need no group of
//! their own here: under `source = "logs"` every interaction in the task's service is a target,
//! so every user is new and the whole table is the new-user table; under `source = "history"`
//! every kept user has earlier behaviour there, so none is.

use crate::eval::task_data::TaskData;

/// `(name, user rows)` of each group, over all task users (not the training prefix rows).
pub fn user_groups(data: &TaskData) -> Vec<(&'static str, Vec<usize>)> {
    let n = data.task_users.min(data.activity.len());
    if n == 0 {
        return Vec::new();
    }
    let mut sorted = data.activity[..n].to_vec();
    sorted.sort_unstable();
    let at = |q: f64| sorted[((n - 1) as f64 * q).round() as usize];
    let (low, high) = (at(0.1), at(0.9));
    let rows = |keep: &dyn Fn(u64) -> bool| (0..n).filter(|&u| keep(data.activity[u])).collect();
    vec![
        ("cold", rows(&|a| a <= low)),
        ("heavy", rows(&|a| a >= high)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::store::Split;

    #[test]
    fn cold_and_heavy_are_the_activity_tenths_with_ties() {
        let mut d = TaskData::for_test(vec![vec![0]; 11], vec![Split::Test; 11], 2);
        // Sorted: 1 1 2 3 4 5 6 7 8 9 30 → 10th percentile = sorted[1] = 1, 90th = sorted[9] = 9.
        d.activity = vec![5, 1, 30, 2, 1, 9, 3, 4, 6, 7, 8];
        let g = user_groups(&d);
        assert_eq!(g[0], ("cold", vec![1, 4]));
        assert_eq!(g[1], ("heavy", vec![2, 5]));
    }
}
