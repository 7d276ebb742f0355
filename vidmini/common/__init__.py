"""Small pieces every layer uses: errors reported as one line, content fingerprints."""
