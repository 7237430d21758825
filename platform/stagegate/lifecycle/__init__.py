"""The lifecycle domain: stages, transition rules, policies and gates. Pure: no I/O."""
