"""The data stage: read sources, render them to plain text, mix by token shares, tokenise and
pack."""
