"""Writers of small Kolors models in the real checkpoint layout (tiny random, full-size random) for offline runs.
Only the profile that needs them (kolors.models) and the CLI's tiny-kolors command import them."""
