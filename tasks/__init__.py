"""SeqIO task and mixture registrations: importing this package registers them (data issue)."""
