# zettabee: the cron alternative to zettabee-replicate.timer. Use one or the other, not
# both: uncomment the line below only where systemd timers are not used.
# The monitoring's freshness thresholds assume a run every 15 minutes.
#
#*/15 * * * * root [ -x /usr/sbin/replicate ] && /usr/sbin/replicate --all
