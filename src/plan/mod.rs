//! The checked, typed plan: a DAG of stages with canonical parameters.
