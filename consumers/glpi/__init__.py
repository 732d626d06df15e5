"""The GLPI ticket consumer: envelopes from the mail queue become GLPI tickets and follow-ups, once each."""
