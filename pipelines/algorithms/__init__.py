"""The algorithm math the phases call: advantage estimators and answer grading."""
