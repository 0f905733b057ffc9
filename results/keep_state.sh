#!/usr/bin/env bash
# Stages (git add -f) the git-ignored files that a later session needs to continue long runs (searches of every
# dataset under results/hyper/, comparison cells, backbone cells), because a
# new checkout holds only what was committed: the checkpoints of every unfinished search (every trial's folder: the
# finished trials' files are read again when the search ends), the resume files (-last.pth and its best .pth) of
# unfinished run_compare cells and bench/backbone.py cells, and the DuoRec search's best trial while the FTRagRec
# search (warm-started from it) has not finished. Files of runs that have finished are unstaged again (git rm
# --cached), so the tree carries resume state only while it is needed. Run it before committing; it commits nothing.
#   bash results/keep_state.sh          # stage, then list what is staged
set -euo pipefail
cd "$(dirname "$0")/.."
H=results/hyper  # one folder per dataset, one per search in it
source results/settings/lib.sh
keep=(); drop=()
for search in "$H"/*/*/; do
  search=${search%/}
  [[ -d $search/checkpoints ]] || continue
  if ! search_finished "$search"; then keep+=("$search/checkpoints")
  elif [[ $(basename "$search") == DuoRec ]] && ! search_finished "$(dirname "$search")/FTRagRec"; then
    trial=$(best_trial "$search")
    keep+=("$search/checkpoints/$trial"); drop+=("$search/checkpoints")
  else drop+=("$search/checkpoints"); fi
done
# resumable cells: a -last.pth exists until the cell has finished
while IFS= read -r last; do
  keep+=("$last"); [[ -f ${last%-last.pth}.pth ]] && keep+=("${last%-last.pth}.pth")
  # a run_compare cell's segment record (cells/<name>.partial.json), which tells the next run to resume it
  cell=$(dirname "$last"); partial=${cell%/checkpoints/*}/$(basename "$cell").partial.json
  [[ $cell == */cells/checkpoints/* && -f $partial ]] && keep+=("$partial")
done < <(find results bench/results -name "*-last.pth" -not -path "$H/*" 2>/dev/null | sort)
for path in "${drop[@]}"; do git rm -r -q --cached --ignore-unmatch "$path" > /dev/null; done
# files of finished cells that an earlier session staged
while IFS= read -r staged; do
  [[ -f ${staged%.pth}-last.pth || ( $staged == *-last.pth && -f $staged ) ]] || git rm -q --cached "$staged"
done < <(git ls-files results bench/results | grep "\.pth$" | grep -v "^$H/" || true)
# segment records of cells that have finished since (run_compare removes them)
while IFS= read -r staged; do
  [[ -f $staged ]] || git rm -q --cached "$staged"
done < <(git ls-files results | grep "\.partial\.json$" || true)
[[ ${#keep[@]} -eq 0 ]] || git add -f "${keep[@]}"
git diff --cached --stat -- results bench/results | tail -n 25
