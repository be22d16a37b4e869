"""Route: declarative rules and series selection; which model reads which series, and why not."""
