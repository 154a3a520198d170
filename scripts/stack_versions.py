"""Print the versions of the libraries nlora's numbers depend on (CI's version tiers log them)."""

from nlora.rundir import software_versions

print("stack:", ", ".join(f"{name} {version}" for name, version in software_versions().items()))
