# Sourced by the issue-17 scripts beside it. A search folder is finished when it has a best.yaml and its results.md
# does not say that the search was interrupted (run_hyper writes that line; default_vs_tuned.py reads the same).
search_finished() { [[ -f $1/best.yaml ]] && ! grep -q "search was interrupted" "$1/results.md"; }
# The trial id that a finished search's best.yaml names in its first line ("... (trial d9fce_00007); ...").
best_trial() { sed -n 's/.*(trial \([^)]*\)).*/\1/p' "$1/best.yaml" 2>/dev/null | head -1; }
