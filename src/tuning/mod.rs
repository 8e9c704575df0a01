//! Tuning by editing config files: rule tests without mocks (`riskd test`),
//! backtests (`riskd replay`) and `riskd check` warnings.

pub mod check;
pub mod replay;
pub mod ruletest;
