"""Ransomware detection in the replicated write stream (docs/ransomware.md).

`detect` counts, per disk and cycle, the changed bytes that look encrypted (the journal
writer calls it for every changed block); `baseline` judges those counts against each
disk's own history (suspicion none|low|medium|high, the suspect checkpoints, the last
clean one); `dismissals` keeps operators' judgements in the journal; `service` ties them
to the alerts, retention and checkpoint choice. Engine code: no Prefect.
"""
